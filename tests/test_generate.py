"""Sampling with the KV cache, and `python -m gpt2exp.generate`: arguments, targets, and a real run."""

from __future__ import annotations

import pytest
import torch

from gpt2exp.generate import main, sample_ids, sample_texts
from tests.conftest import FAST, run_cli
from tests.test_targets import make_checkpoint, make_run_dir, write_manifest

BLOCK = 16  # n_positions of the test model
VOCAB = 64
EOS = 0


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model():
    """A tiny random GPT-2 in float64, so cached and uncached logits agree far below any argmax gap."""
    return tiny_gpt2().double()


class CharTokenizer:
    """Just enough of a tokenizer for sample_texts: one id per character; decode shows the ids."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))

    def __len__(self) -> int:
        return VOCAB


def naive_greedy(model, ids: list[int], max_new_tokens: int, refill: bool = False) -> list[int]:
    """Greedy decoding without a cache: every step reruns the whole context.

    refill=False crops the context to the last n_positions tokens (a sliding window); refill=True
    follows the cached sampler's rule instead: when the context would pass n_positions, it restarts
    from the last n_positions // 2 tokens.
    """
    tokens = list(ids)
    start = max(0, len(tokens) - BLOCK)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if refill and len(tokens) - start > BLOCK:
                start = len(tokens) - BLOCK // 2
            context = tokens[start:] if refill else tokens[-BLOCK:]
            logits = model(torch.tensor([context]), use_cache=False).logits[:, -1, :].float()
            tokens.append(int(logits.argmax(dim=-1)))
    return tokens


class CountFed:
    """Counts forward calls and the token positions fed into the model (at its embedding)."""

    def __init__(self, model):
        self.calls = self.positions = 0
        self._hook = model.transformer.wte.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.calls += 1
        self.positions += args[0].numel()

    def __enter__(self) -> CountFed:
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()


PROMPT = [EOS, 5, 9, 17]


# -- the sampler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("new", [1, 7, BLOCK - len(PROMPT) + 1])  # the last one fills every position
def test_greedy_with_the_cache_equals_the_no_cache_loop(model, new):
    with torch.no_grad():
        cached = sample_ids(model, PROMPT, new, temperature=0)
    assert cached == naive_greedy(model, PROMPT, new)
    assert len(cached) == len(PROMPT) + new


def test_greedy_sample_texts_equals_the_no_cache_loop(model):
    tokenizer = CharTokenizer()
    prompt = "ab"
    ids = [EOS, *tokenizer(prompt)["input_ids"]]
    (text,) = sample_texts(model, tokenizer, prompt, count=1, max_new_tokens=10, temperature=0)
    assert text == tokenizer.decode(naive_greedy(model, ids, 10)[1:])  # the eos in front is not shown


def test_the_same_seed_gives_the_same_text_and_another_seed_another(model):
    tokenizer = CharTokenizer()
    first = sample_texts(model, tokenizer, "ab", count=3, max_new_tokens=20, seed=1)
    assert sample_texts(model, tokenizer, "ab", count=3, max_new_tokens=20, seed=1) == first
    assert sample_texts(model, tokenizer, "ab", count=3, max_new_tokens=20, seed=2) != first
    assert len(set(first)) == 3  # the samples of one call differ from each other
    assert sample_texts(model, tokenizer, "ab", count=1, max_new_tokens=20, seed=1) == first[:1]  # sample 1 alone
    assert all(text.startswith(tokenizer.decode(tokenizer("ab")["input_ids"]) + " ") for text in first)


def test_sampling_leaves_the_global_rng_and_the_training_mode_alone(model):
    tokenizer = CharTokenizer()
    model.train()
    try:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        sample_texts(model, tokenizer, "ab", count=2, max_new_tokens=5, seed=7)
        assert torch.equal(torch.rand(3), expected)
        assert model.training
    finally:
        model.eval()


def test_top_k_1_is_greedy(model):
    with torch.no_grad():
        top1 = sample_ids(model, PROMPT, 10, temperature=0.8, top_k=1, generator=torch.Generator().manual_seed(3))
    assert top1 == naive_greedy(model, PROMPT, 10)


def test_a_padded_embedding_never_samples_an_id_the_tokenizer_lacks(model):
    """The rows past the tokenizer's vocabulary (model.vocab_multiple) are made the likeliest: the model
    alone samples them at once, sample_texts with the tokenizer's length never."""

    class SmallerTokenizer(CharTokenizer):
        def __len__(self) -> int:
            return VOCAB - 8

    with torch.no_grad():
        model.transformer.wte.weight[VOCAB - 8 :] *= 50  # tied: the lm_head favours the last 8 ids
        free = sample_ids(model, PROMPT, 20, temperature=1.0, top_k=0, generator=torch.Generator().manual_seed(0))
    assert max(free[len(PROMPT) :]) >= VOCAB - 8
    texts = sample_texts(model, SmallerTokenizer(), "ab", count=3, max_new_tokens=20, temperature=1.0, top_k=0)
    drawn = [int(i) for text in texts for i in text.split()]
    assert len(drawn) == 3 * (2 + 20) and max(drawn) < VOCAB - 8


@pytest.mark.parametrize("prompt_length", [4, BLOCK + 5])  # the second prompt is itself cropped to the window
def test_sampling_goes_past_n_positions_by_refilling_half_the_window(model, prompt_length):
    prompt = [EOS] + [1 + i % (VOCAB - 1) for i in range(prompt_length - 1)]
    new = 3 * BLOCK + 5
    with torch.no_grad():
        greedy = sample_ids(model, prompt, new, temperature=0)
        sampled = sample_ids(model, prompt, new, temperature=1.0, top_k=None, generator=torch.Generator())
    assert greedy[: len(prompt)] == prompt and len(greedy) == len(sampled) == prompt_length + new
    assert all(0 <= t < VOCAB for t in sampled)
    # the same context at every step as a no-cache loop that refills the same way
    assert greedy == naive_greedy(model, prompt, new, refill=True)


def test_the_positions_fed_grow_linearly_not_quadratically(model):
    new = BLOCK - len(PROMPT) + 1
    with torch.no_grad(), CountFed(model) as fed:
        sample_ids(model, PROMPT, new, temperature=0)
    # the prompt once, then one position per step; the last token is sampled, never fed
    assert (fed.calls, fed.positions) == (new, len(PROMPT) + new - 1)
    with CountFed(model) as naive:
        naive_greedy(model, PROMPT, new)
    assert naive.positions == sum(range(len(PROMPT), len(PROMPT) + new)) > 2 * fed.positions

    # past n_positions: one refill of BLOCK // 2 positions per BLOCK // 2 new tokens, about two positions a token
    long = 6 * BLOCK
    with torch.no_grad(), CountFed(model) as fed:
        sample_ids(model, PROMPT, long, temperature=0)
    assert fed.calls == long and fed.positions <= 2 * (len(PROMPT) + long)


# -- the command line, in process ----------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    """A run dir with one checkpoint written by transformers: the model above and a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator(["ROMEO: but soft", "JULIET: ay me"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    run = make_run_dir(tmp_path / "run")
    path = run / "checkpoints" / "step_00000002"
    path.mkdir()
    tiny_gpt2().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return write_manifest(path, 2)


def test_generate_from_a_run_dir_and_from_its_checkpoint(checkpoint, capsys):
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "6", "--num-samples", "2", "--seed", "3"]
    main([str(checkpoint.parent.parent), *args])
    out = capsys.readouterr().out
    assert out.count("=== sample") == 2 and out.count("ROMEO:") == 2
    main([str(checkpoint), *args])
    assert capsys.readouterr().out == out  # the run's newest checkpoint is this one
    main([str(checkpoint), "--max-new-tokens", "4"])
    assert "=== sample" not in capsys.readouterr().out  # one sample: no header


def test_a_run_dir_falls_back_to_its_newest_checkpoint_that_verifies(checkpoint, capsys):
    newer = make_checkpoint(checkpoint.parent / "step_00000004", {"model.safetensors": b"weights"})
    (newer / "model.safetensors").write_bytes(b"changed")
    main([str(checkpoint.parent.parent), "--max-new-tokens", "3", "--temperature", "0"])
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as caught:  # a named checkpoint never becomes another one
        main([str(newer), "--max-new-tokens", "3"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint verifies; tried: step_00000004 (")


def test_a_run_dir_without_checkpoints(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run")
    with pytest.raises(SystemExit) as caught:
        main([str(run)])
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"error: run dir {run} has no checkpoints yet; nothing to sample from\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["PATH", "--bogus"], "error: unrecognized arguments: --bogus"),
        ([], "error: the following arguments are required: PATH"),
        (["PATH", "--num-samples", "0"], "error: argument --num-samples: must be >= 1, got 0"),
        (["PATH", "--max-new-tokens", "x"], "error: argument --max-new-tokens: not an integer: 'x'"),
        (["PATH", "--temperature", "warm"], "error: argument --temperature: invalid float value: 'warm'"),
        (["PATH", "--temperature", "nan"], "error: argument --temperature: must be a finite number, got nan"),
        (["PATH", "--seed", "4294967296"], "error: argument --seed: must be < 2**32 (4294967296), got 4294967296"),
        (["PATH", "--seed", "-1"], "error: argument --seed: must be >= 0, got -1"),
        (["PATH", "prompt=ROMEO:"], "error: unrecognized arguments: prompt=ROMEO:"),  # the old key=value style
        (["nope"], "error: path does not exist: nope; pass a run dir or a checkpoint dir"),
    ],
)
def test_bad_arguments_are_one_error_line_and_exit_2(checkpoint, capsys, monkeypatch, args, message):
    monkeypatch.chdir(checkpoint.parent.parent.parent)
    args = [str(checkpoint) if arg == "PATH" else arg for arg in args]
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == message + "\n" and captured.out == ""


def test_a_device_torch_cannot_use_is_one_error_line(checkpoint, capsys):
    with pytest.raises(SystemExit) as caught:
        main([str(checkpoint), "--device", "no-such-device"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot use --device no-such-device: ") and err.count("\n") == 1


def test_help_shows_the_examples_and_exits_0(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m gpt2exp.generate [-h] [--prompt TEXT]")
    assert 'python -m gpt2exp.generate outputs/<date>/<time> --prompt "ROMEO:" --max-new-tokens 200' in out
    for flag in ("--max-new-tokens N", "--temperature T", "--top-k K", "--num-samples N", "--seed S", "--device"):
        assert flag in out


# -- the real command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run of the real training CLI."""
    cwd = tmp_path_factory.mktemp("generate")
    result = run_cli("gpt2exp.train", *FAST, f"hydra.run.dir={cwd / 'run'}", "trainer.max_steps=4", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


@pytest.mark.slow
def test_generate_samples_from_a_run_dir(trained):
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "5", "--num-samples", "2", "--seed", "1"]
    result = run_cli("gpt2exp.generate", str(trained), *args, cwd=trained)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== sample") == 2 and result.stdout.count("ROMEO:") == 2
    again = run_cli("gpt2exp.generate", str(trained / "checkpoints" / "step_00000004"), *args, cwd=trained)
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout  # same checkpoint, same seed: same text


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), ([".", "--bogus"], 2)])
def test_the_real_command_answers_help_and_bad_flags(tmp_path, args, code):
    result = run_cli("gpt2exp.generate", *args, cwd=tmp_path)
    assert result.returncode == code
    if code == 0:
        assert result.stdout.startswith("usage: python -m gpt2exp.generate") and result.stderr == ""
    else:
        assert result.stderr.splitlines() == ["error: unrecognized arguments: --bogus"] and result.stdout == ""


def test_a_tiny_temperature_samples_the_likeliest_token():
    """logits / 1e-45 overflow to inf, and inf - inf in the softmax was NaN: the largest is shifted to 0 first."""
    from gpt2exp.generate import next_token

    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    for temperature in (1e-30, 1e-45, 1e-46, 1e-300):  # below float32's smallest, 0 in the logits' dtype: 0/0
        picked = next_token(logits, temperature, None, torch.Generator().manual_seed(0))
        assert picked.tolist() == [1, 0]
