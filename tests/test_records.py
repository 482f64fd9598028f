"""The config of record describes what ran, and the saved tokenizer describes the model it goes with.

- fp16 on a CPU and torch.compile off CUDA are not used: one line says so at start and config.yaml
  records what ran (fp32, compile false); a resume keeps those recorded values.
- Fine-tuning from a local model records the pretrained model's shape, not the preset's.
- A model folder without tokenizer files, named as the tokenizer, is refused as such.
- The tokenizer files of the run dir and every checkpoint say `model_max_length` = the model's
  n_positions, so HF pipelines crop to the real context.
- A warm-up longer than the run is said in one line at start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from gpt2exp.data import load_tokenizer, tokenizer_with_context_length, train_bpe
from gpt2exp.errors import UserError
from gpt2exp.trainer import config_as_run
from tests.conftest import FAST, run_cli

SHAPELESS = [a for a in FAST if not a.startswith(("model.n_layer", "model.n_head", "model.n_embd"))]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A 2-layer, 64-wide 'pretrained' GPT-2 (64 positions) and its tokenizer, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2exp.data import shakespeare_files

    out = tmp_path_factory.mktemp("pretrained")
    train_bpe([shakespeare_files()[0].read_text()], 300, out)
    eos = load_tokenizer(str(out)).eos_token_id
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64}
    config = GPT2Config(**shape, vocab_size=300, bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_only_dir(tmp_path_factory):
    """A model folder without tokenizer files (config.json and weights only)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("model-only")
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(out)
    return out


def gpt2_config(**shape):
    from transformers import GPT2Config

    return GPT2Config(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32, **shape})


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gpt2exp"]


# -- unit: what the config of record says ---------------------------------------------------------


def test_fp16_and_compile_on_cpu_are_said_and_recorded_as_what_ran(compose, caplog):
    cfg = compose([*FAST, "trainer.precision=fp16", "trainer.compile=true", "scheduler.warmup_steps=0"])
    with caplog.at_level(logging.INFO, logger="gpt2exp"):
        ran = config_as_run(cfg, "cpu", gpt2_config())
    assert (ran.trainer.precision, ran.trainer.compile) == ("fp32", False)
    assert (cfg.trainer.precision, cfg.trainer.compile) == ("fp16", True)  # the caller's config is left alone
    assert messages(caplog) == [
        "trainer.precision=fp16 is not used on cpu: training in fp32 (config.yaml records fp32)",
        "trainer.compile=true is not used on cpu: running uncompiled (recorded as false)",
    ]


def test_bf16_runs_on_cpu_as_autocast_and_stays_recorded(compose, caplog):
    cfg = compose([*FAST, "trainer.precision=bf16", "scheduler.warmup_steps=0"])
    with caplog.at_level(logging.INFO, logger="gpt2exp"):
        assert config_as_run(cfg, "cpu", gpt2_config()).trainer.precision == "bf16"
    assert messages(caplog) == []


def test_on_cuda_fp16_and_compile_stay(compose, caplog):
    cfg = compose([*FAST, "trainer.precision=fp16", "trainer.compile=true", "scheduler.warmup_steps=0"])
    with caplog.at_level(logging.INFO, logger="gpt2exp"):
        ran = config_as_run(cfg, "cuda", gpt2_config())
    assert (ran.trainer.precision, ran.trainer.compile, messages(caplog)) == ("fp16", True, [])


def test_a_pretrained_model_records_its_own_shape(compose, caplog):
    cfg = compose(["model=gpt2_124m", "model.init=/models/small", "scheduler.warmup_steps=0"])
    with caplog.at_level(logging.INFO, logger="gpt2exp"):
        ran = config_as_run(cfg, "cpu", gpt2_config(n_layer=2, n_head=2, n_embd=64, n_positions=64))
    assert (ran.model.n_layer, ran.model.n_head, ran.model.n_embd, ran.model.block_size) == (2, 2, 64, 1024)
    assert (ran.model.vocab_multiple, ran.model.activation) == (1, "gelu_new")  # the pretrained model's own
    assert messages(caplog) == [
        "model.init=/models/small is n_layer=2, n_head=2, n_embd=64: config.yaml records that shape "
        "(the config said n_layer=12, n_head=12, n_embd=768)",
        "model.init=/models/small keeps its own vocabulary: config.yaml records model.vocab_multiple=1",
        "model.init=/models/small keeps its own activation: config.yaml records model.activation=gelu_new",
    ]


def test_a_config_of_record_is_already_what_ran(compose, caplog):
    """On resume the record goes through the same step and comes out unchanged, silently."""
    cfg = compose([*FAST, "trainer.precision=fp16", "trainer.compile=true", "scheduler.warmup_steps=0"])
    record = config_as_run(cfg, "cpu", gpt2_config())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpt2exp"):
        assert config_as_run(record, "cpu", gpt2_config()) == record
    assert messages(caplog) == []


@pytest.mark.parametrize(("steps", "warned"), [(10, True), (30, False), (0, False)])
def test_a_warmup_longer_than_the_run_is_said_in_one_line(compose, caplog, steps, warned):
    cfg = compose([*FAST, f"trainer.max_steps={steps}", "scheduler.warmup_steps=30"])
    with caplog.at_level(logging.INFO, logger="gpt2exp"):
        config_as_run(cfg, "cpu", gpt2_config())
    expected = (
        "scheduler.warmup_steps=30 is more than trainer.max_steps=10: the LR stays in warm-up and never reaches "
        "optimizer.lr; lower scheduler.warmup_steps to train at the full LR"
    )
    assert messages(caplog) == ([expected] if warned else [])


# -- unit: tokenizer files ------------------------------------------------------------------------


def test_a_model_folder_without_tokenizer_files_says_the_tokenizer_is_missing(model_only_dir):
    with pytest.raises(UserError) as caught:
        load_tokenizer(str(model_only_dir))
    assert str(caught.value) == (
        f"no tokenizer in {model_only_dir}: it has none of tokenizer.json, vocab.json, tokenizer.model, "
        "spiece.model, vocab.txt; save one there with tokenizer.save_pretrained(path), or set "
        "data.tokenizer.name to a tokenizer's path or hub name (or bpe)"
    )


def test_the_tokenizer_copy_for_a_model_states_its_context_length(pretrained_dir, tmp_path):
    from transformers import AutoTokenizer

    source = tmp_path / "tokenizer"
    AutoTokenizer.from_pretrained(pretrained_dir).save_pretrained(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    copy = tokenizer_with_context_length(source, 128)
    assert copy == tmp_path / "tokenizer-ctx128"
    assert AutoTokenizer.from_pretrained(copy).model_max_length == 128
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # the shared one is untouched
    assert {p.name for p in copy.iterdir()} == set(before)
    assert tokenizer_with_context_length(source, 128) == copy  # built once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer", "tokenizer-ctx128"]  # no staging left


# -- the real CLI ---------------------------------------------------------------------------------


def record_of(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def newest_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_fp16_and_compile_on_cpu_are_recorded_as_fp32_uncompiled_and_kept_on_resume(tmp_path):
    from transformers import AutoTokenizer, pipeline

    run_dir = tmp_path / "run"
    args = [*FAST, "trainer.precision=fp16", "trainer.compile=true", "scheduler.warmup_steps=2", "device=cpu"]
    first = run_cli("gpt2exp.train", *args, "trainer.max_steps=4", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "trainer.precision=fp16 is not used on cpu: training in fp32 (config.yaml records fp32)" in log
    assert "trainer.compile=true is not used on cpu: running uncompiled (recorded as false)" in log
    record = record_of(run_dir)
    assert (record["trainer"]["precision"], record["trainer"]["compile"]) == ("fp32", False)
    assert json.loads((run_dir / "run.json").read_text())["requested"] == {  # what a requeue is held to
        "trainer.precision": "fp16", "trainer.compile": True, "model.n_layer": 2, "model.n_head": 2,
        "model.n_embd": 32, "model.vocab_multiple": 64, "model.activation": "gelu_pytorch_tanh",
    }  # fmt: skip
    recorded = (run_dir / "config.yaml").read_bytes()

    # the tokenizer files of the run dir and of each checkpoint state the model's context length
    checkpoint = newest_checkpoint(run_dir)
    n_positions = json.loads((checkpoint / "config.json").read_text())["n_positions"]
    assert n_positions == 32
    assert AutoTokenizer.from_pretrained(checkpoint).model_max_length == n_positions
    assert AutoTokenizer.from_pretrained(run_dir / "tokenizer").model_max_length == n_positions
    # ... so an HF pipeline can crop a prompt longer than the context ("hole") instead of an IndexError
    generator = pipeline("text-generation", model=str(checkpoint), device="cpu")
    prompt = "ROMEO: " * 40
    assert len(generator.tokenizer(prompt)["input_ids"]) > n_positions
    out = generator(prompt, max_new_tokens=5, do_sample=False, handle_long_generation="hole")
    assert out[0]["generated_text"]

    second = run_cli("gpt2exp.train", f"resume={run_dir}", "trainer.max_steps=6", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run_dir / "config.yaml").read_bytes() == recorded
    log = (run_dir / "train.log").read_text()
    assert log.count("is not used on cpu") == 2  # said at the first start only: the record says what ran
    assert "saved under another config" not in log
    assert AutoTokenizer.from_pretrained(newest_checkpoint(run_dir)).model_max_length == n_positions


@pytest.mark.slow
def test_finetuning_a_local_model_records_its_shape_and_resumes_with_it(tmp_path, pretrained_dir):
    from transformers import AutoTokenizer

    run_dir = tmp_path / "run"
    args = ["+experiment=finetune_gpt2", *SHAPELESS, f"model.init={pretrained_dir}", "model.block_size=32"]
    args += ["scheduler.warmup_steps=2", "trainer.eval_every=3", f"hydra.run.dir={run_dir}"]
    first = run_cli("gpt2exp.train", *args, "trainer.max_steps=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    model = record_of(run_dir)["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"]) == (2, 2, 64, 32)
    assert model["init"] == str(pretrained_dir)
    assert (
        f"model.init={pretrained_dir} is n_layer=2, n_head=2, n_embd=64: config.yaml records that shape "
        "(the config said n_layer=12, n_head=12, n_embd=768)" in (run_dir / "train.log").read_text()
    )
    assert AutoTokenizer.from_pretrained(newest_checkpoint(run_dir)).model_max_length == 64  # the model's

    recorded = (run_dir / "config.yaml").read_bytes()
    second = run_cli("gpt2exp.train", f"resume={run_dir}", "trainer.max_steps=5", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run_dir / "config.yaml").read_bytes() == recorded
    assert "saved under another config" not in (run_dir / "train.log").read_text()
    assert newest_checkpoint(run_dir).name == "step_00000005"


@pytest.mark.slow
def test_a_model_folder_named_as_the_tokenizer_without_its_files_is_refused(tmp_path, model_only_dir):
    result = run_cli(
        "gpt2exp.train", *FAST, f"model.init={model_only_dir}", f"data.tokenizer.name={model_only_dir}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: no tokenizer in {model_only_dir}: it has none of tokenizer.json, vocab.json, tokenizer.model, "
        "spiece.model, vocab.txt; save one there with tokenizer.save_pretrained(path), or set "
        "data.tokenizer.name to a tokenizer's path or hub name (or bpe)"
    )
    assert "vocab 1" not in result.stderr and "Traceback" not in result.stderr
