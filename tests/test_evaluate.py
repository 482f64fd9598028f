"""`python -m gpt2exp.evaluate`: a checkpoint's loss, perplexity and bits per byte, without training.

On the run's own data and windows the loss is the val/loss training logged at that checkpoint's step,
exactly; data overrides are checked as the train command checks them; nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from gpt2exp.evaluate import main, token_bytes
from gpt2exp.resume import fix_values_of_record
from gpt2exp.trainer import Trainer
from tests.conftest import CONF_DIR, FAST, run_cli

RUN = [*FAST, "trainer.max_steps=6", "trainer.eval_every=3", "checkpoint.every_steps=3", "checkpoint.keep_last=-1"]
STORY = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, again and again.\n" for i in range(400))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run with checkpoints at steps 3 and 6, each evaluated when saved."""
    from gpt2exp.composing import compose
    from gpt2exp.config import register_schemas

    register_schemas()
    threads = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run_dir.mkdir()
    Trainer(fix_values_of_record(compose(CONF_DIR, RUN), 1), run_dir).run(None)
    torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def logged_val_loss(run_dir, step: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (value,) = [row["val/loss"] for row in rows if row["step"] == step and "val/loss" in row]
    return value


def files_of(root) -> dict[str, str]:
    """Every path under `root` (dirs too) with the sha256 of each file."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def evaluate_json(capsys, *args: str) -> dict:
    main([*args, "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return json.loads(out)


def usage_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err.strip()


# -- the run's own data --------------------------------------------------------------------------


def test_a_run_dir_gives_the_val_loss_training_logged_at_its_newest_checkpoint(run, capsys):
    before = files_of(run)
    out = evaluate_json(capsys, str(run))
    assert (out["step"], out["own_data"], out["windows"], out["batches"]) == (6, True, 8, 2)  # eval_batches x batch
    assert out["loss"] == logged_val_loss(run, 6)
    assert out["logged_val_loss"] == out["loss"]
    assert out["perplexity"] == math.exp(out["loss"])
    assert out["tokens"] == 8 * 32
    assert out["bits_per_byte"] == out["nats"] / (math.log(2) * out["bytes"])
    assert files_of(run) == before  # nothing written into the run dir


def test_a_checkpoint_dir_gives_the_val_loss_logged_at_its_step(run, capsys):
    out = evaluate_json(capsys, str(run / "checkpoints" / "step_00000003"))
    assert out["step"] == 3
    assert out["loss"] == logged_val_loss(run, 3)


def test_batches_all_takes_every_non_overlapping_window(run, capsys):
    out = evaluate_json(capsys, str(run), "--batches", "all", "--batch-size", "64")
    windows = len(range(0, out["val_tokens"] - 32, 32))
    assert (out["windows"], out["tokens"], out["batches"]) == (windows, windows * 32, math.ceil(windows / 64))
    assert out["logged_val_loss"] is None and out["own_data"] is True


def test_the_table_names_each_number(run, capsys):
    main([str(run)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["checkpoint", "data", "windows", "loss", "perplexity", "bits/byte"]
    loss = f"{logged_val_loss(run, 6):.4f}"
    assert lines[3] == f"loss        {loss}  (training logged {loss} at this step)"
    assert "(the run's own)" in lines[1] and "8 of 32 tokens in 2 batches, on cpu" in lines[2]


# -- other data ----------------------------------------------------------------------------------


def reference(run, text: str, val_fraction: float) -> tuple[float, int]:
    """Mean loss (float64 sums) and decoded UTF-8 bytes over every window of the validation tail of
    `text`, computed here without gpt2exp.evaluate."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from gpt2exp.data import split_tail

    checkpoint = run / "checkpoints" / "step_00000006"
    model, tokenizer = GPT2LMHeadModel.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)
    _, val = split_tail([text], val_fraction)
    ids = [i for doc in val for i in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
    nats, tokens, num_bytes = 0.0, 0, 0
    for start in range(0, len(ids) - 32, 32):
        window = torch.tensor([ids[start : start + 33]])
        with torch.no_grad():
            logits = model(window[:, :-1]).logits
        nats += torch.nn.functional.cross_entropy(logits[0].double(), window[0, 1:], reduction="sum").item()
        tokens += 32
        num_bytes += len(tokenizer.decode(window[0, 1:].tolist(), skip_special_tokens=True).encode())
    return nats / tokens, num_bytes


def test_text_files_override_evaluates_that_text_with_the_checkpoints_tokenizer(run, capsys, tmp_path):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    before = files_of(run)
    out = evaluate_json(
        capsys, str(run), "data=text_files", f"data.files=[{story}]", "data.val_fraction=0.5", "--batches", "all"
    )
    loss, num_bytes = reference(run, STORY, 0.5)
    assert out["own_data"] is False and out["data"]["files"] == [str(story)] and out["logged_val_loss"] is None
    assert out["loss"] == pytest.approx(loss, rel=1e-6)
    assert out["bytes"] == num_bytes
    assert out["bits_per_byte"] == pytest.approx(loss * out["tokens"] / (math.log(2) * num_bytes), rel=1e-6)
    assert files_of(run) == before


def test_a_data_key_override_keeps_the_rest_of_the_runs_data(run, capsys):
    out = evaluate_json(capsys, str(run), "data.val_fraction=0.1")
    assert out["data"]["source"] == "shakespeare" and out["data"]["val_fraction"] == 0.1
    assert out["own_data"] is False
    assert out["val_tokens"] > 1.9 * evaluate_json(capsys, str(run))["val_tokens"]  # twice the default 0.05


def test_a_run_on_text_files_is_evaluated_on_its_own_files(capsys, tmp_path):
    """data.files is required for data=text_files: the record's own fills it in."""
    from gpt2exp.composing import compose

    story = tmp_path / "story.txt"
    story.write_text(STORY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = [*FAST, "data=text_files", f"data.files=[{story}]", "trainer.max_steps=2", "trainer.num_samples=0"]
    Trainer(fix_values_of_record(compose(CONF_DIR, overrides), 1), run_dir).run(None)
    out = evaluate_json(capsys, str(run_dir))
    assert out["own_data"] is True and out["data"]["files"] == [str(story)]
    assert out["loss"] == pytest.approx(logged_val_loss(run_dir, 2), rel=1e-6)
    again = evaluate_json(capsys, str(run_dir), "data.val_fraction=0.5")  # a key changed, the files kept
    assert again["data"]["files"] == [str(story)] and again["own_data"] is False


def test_token_bytes_count_the_utf8_bytes_of_any_text_exactly(run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoints" / "step_00000006")
    per_token = token_bytes(tokenizer)
    assert per_token is not None and per_token[tokenizer.eos_token_id] == 0
    text = "Café — naïve façade, 日本語 and 🙂 emoji.\nROMEO: O, she doth teach the torches to burn bright!"
    ids = tokenizer(text)["input_ids"]
    assert int(per_token[np.array(ids)].sum()) == len(text.encode("utf-8"))


# -- bad input: one line, exit 2 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["optimizer.lr=1"],
            "error: optimizer.lr=1 is not a data override; evaluate takes data=OPTION and data.KEY=VALUE only",
        ),
        (
            ["data.files=[x.txt]"],
            "error: data.files applies only to data=text_files, not to data=shakespeare; did you mean data=text_files?",
        ),
        (
            ["data=text_files", "data.files=[missing.txt]"],
            "error: data file not found: missing.txt; check the path in data.files=[...]",
        ),
        (["data.val_fraction=1.5"], "error: data.val_fraction=1.5 must "),  # then the range, in words
        (
            ["data.tokenizer.name=gpt2"],
            "error: data.tokenizer.name=gpt2: the text is encoded with the checkpoint's own tokenizer, "
            "which cannot change",
        ),
        (
            ["data=nope"],
            "error: In 'config': Could not find 'data/nope'; available: fineweb_edu, hf_dataset, openwebtext, "
            "shakespeare, text_files",
        ),
        (["--batches", "0"], "error: argument --batches: must be >= 1, got 0"),
        (["--batch-size", "x"], "error: argument --batch-size: not an integer: 'x'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, capsys, args, message):
    before = files_of(run)
    assert usage_error(capsys, str(run), *args).startswith(message)
    assert files_of(run) == before


def test_a_missing_path_is_one_line(capsys, tmp_path):
    assert usage_error(capsys, str(tmp_path / "nope")) == (
        f"error: path does not exist: {tmp_path / 'nope'}; pass a run dir or a checkpoint dir"
    )


# -- the real CLI --------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_evaluates_a_trained_run_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_cli("gpt2exp.train", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    before = files_of(run_dir)
    done = run_cli("gpt2exp.evaluate", str(run_dir / "checkpoints" / "step_00000003"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["step"] == 3 and out["loss"] == logged_val_loss(run_dir, 3)
    bad = run_cli("gpt2exp.evaluate", str(run_dir), "data.files=[x.txt]", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (
        "error: data.files applies only to data=text_files, not to data=shakespeare; did you mean data=text_files?\n"
    )
    assert files_of(run_dir) == before


def test_the_data_line_names_how_validation_was_held_out():
    from gpt2exp.evaluate import describe_data

    files = {"source": "text_files", "files": ["a.txt", "b/*.txt"], "val_fraction": 0.05}
    assert describe_data({**files, "holdout": "documents"}) == "a.txt, b/*.txt, 0.05 of the documents held out"
    assert describe_data({**files, "holdout": "tail"}) == "a.txt, b/*.txt, last 0.05 of the text"
    assert describe_data(files) == "a.txt, b/*.txt, last 0.05 of the text"  # a 0.1 record: no holdout key
    hub = {"source": "hf_dataset", "dataset": "wikitext", "split": "train", "val_split": "validation"}
    assert describe_data({**hub, "val_fraction": 0.05}) == "wikitext (validation), split validation"
