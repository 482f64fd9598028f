"""The real command line, in subprocesses: a short run, its run dir, generate, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST, run_cli

pytestmark = pytest.mark.slow


def only_run_dir(root: Path) -> Path:
    dirs = [p for p in (root / "outputs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 20-step run of the real CLI in a temp dir."""
    cwd = tmp_path_factory.mktemp("cli")
    result = run_cli(
        "gpt2exp.train",
        *FAST,
        "trainer.max_steps=20",
        "trainer.log_every=5",
        "trainer.eval_every=10",
        "optimizer.lr=3e-3",
        "scheduler.warmup_steps=2",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(cwd), result


def test_a_short_run_writes_the_run_dir_contract(short_run):
    run_dir, _ = short_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "run.json", "train.log", "metrics.jsonl", "samples.txt", "checkpoints", ".hydra"} <= names
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000020"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and len(info["run_id"]) == 12
    assert set(info["versions"]) >= {"torch", "transformers", "tokenizers", "gpt2exp"}
    record = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert record["trainer"]["max_steps"] == 20 and record["scheduler"]["decay_steps"] == 20
    assert record["trainer"]["num_threads"] == 1
    assert "train" in (run_dir / "train.log").read_text()


def test_a_short_run_logs_every_step_once_with_a_falling_loss(short_run):
    run_dir, _ = short_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    assert rows[0].keys() == {"step", "val/loss"}  # the starting point of the validation curve
    rows = rows[1:]
    assert all({"train/loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "val/loss" in r] == [10, 20]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.3
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert val[1] < val[0]


def test_the_final_checkpoint_loads_with_transformers(short_run):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ckpt = short_run[0] / "checkpoints" / "step_00000020"
    model = GPT2LMHeadModel.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert model.config.n_layer == 2 and len(tokenizer) == 512


def test_samples_are_printed_and_saved(short_run):
    run_dir, result = short_run
    saved = (run_dir / "samples.txt").read_text()
    assert saved.startswith("=== sample 1 ===\n") and saved in result.stdout


def test_a_normal_run_prints_no_warnings(short_run):
    _, result = short_run
    output = (result.stdout + result.stderr).lower()
    assert "warn" not in output and "traceback" not in output and "loss_type" not in output


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_cli("gpt2exp.train", "--cfg", "job", "optimizer.lr=0.005", cwd=tmp_path)
    assert result.returncode == 0
    cfg = yaml.safe_load(result.stdout)
    assert cfg["optimizer"]["lr"] == 0.005 and cfg["model"]["n_layer"] == 4
    assert not (tmp_path / "outputs").exists()


def test_help_lists_the_groups(tmp_path):
    result = run_cli("gpt2exp.train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("model:", "optimizer:", "scheduler:", "data:", "checkpoint:", "logger:", "experiment:"):
        assert group in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+experiment=nope"], "Could not find 'experiment/nope'; available: finetune_gpt2"),
        (["trainer.batch_size=0"], "trainer.batch_size=0 must be at least 1"),
        (["optimizer.lr=abc"], "could not be converted to Float (key optimizer.lr)"),
        (["data=text_files", "data.files=[missing.txt]"], "data file not found: missing.txt"),
        (
            ["model.init=no-such-model-xyz"],  # a BPE trained here would feed the model other token ids
            "model.init=no-such-model-xyz reads its own tokenizer's token ids, not those of a BPE trained here; "
            "add data.tokenizer.name=no-such-model-xyz (as +experiment=finetune_gpt2 does)",
        ),
        (["resume="], "resume= names nothing; pass resume=<run dir>, a checkpoint dir, a sweep dir or resume=auto"),
        (["resume=''"], "resume= names nothing; pass resume=<run dir>"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli("gpt2exp.train", *FAST, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_block_size_beyond_a_pretrained_model_is_refused(tmp_path, pretrained_dir):
    result = run_cli(
        "gpt2exp.train",
        *FAST,
        f"model.init={pretrained_dir}",
        f"data.tokenizer.name={pretrained_dir}",
        "model.block_size=64",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "model.block_size=64 is larger than" in result.stderr and "supports (32)" in result.stderr


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny 'pretrained' GPT-2 and its tokenizer, saved with save_pretrained like a hub download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2exp.data import shakespeare_files, train_bpe

    out = tmp_path_factory.mktemp("pretrained")
    train_bpe([shakespeare_files()[0].read_text()], 300, out)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=300)).save_pretrained(out)
    return out


def test_finetune_starts_from_pretrained_weights_by_path(tmp_path, pretrained_dir):
    from safetensors.torch import load_file

    result = run_cli(
        "gpt2exp.train",
        "+experiment=finetune_gpt2",
        *FAST,
        f"model.init={pretrained_dir}",
        "model.block_size=32",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    record = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert record["model"]["init"] == str(pretrained_dir)
    assert record["data"]["tokenizer"]["name"] == str(pretrained_dir)
    before = load_file(pretrained_dir / "model.safetensors")
    after = load_file(run_dir / "checkpoints" / "step_00000003" / "model.safetensors")
    assert before.keys() <= after.keys()
    # a few small steps move the pretrained weights a little, not to a fresh init
    delta = (after["transformer.wpe.weight"] - before["transformer.wpe.weight"]).abs().max().item()
    assert 0 < delta < 0.05


def test_a_pretrained_model_saved_in_bf16_trains_in_fp32(tmp_path, pretrained_dir):
    """transformers keeps a checkpoint's dtype by default: bf16 weights and AdamW moments would round
    most fine-tuning updates away while config.yaml says fp32."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    half = tmp_path / "bf16"
    shutil.copytree(pretrained_dir, half)
    GPT2LMHeadModel.from_pretrained(pretrained_dir).to(torch.bfloat16).save_pretrained(half)
    result = run_cli(
        "gpt2exp.train", *FAST, f"model.init={half}", f"data.tokenizer.name={half}", "trainer.max_steps=2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    step = only_run_dir(tmp_path) / "checkpoints" / "step_00000002"
    assert {t.dtype for t in load_file(step / "model.safetensors").values()} == {torch.float32}
    moments = torch.load(step / "optimizer.pt", weights_only=True)["optimizer"]["state"].values()
    assert {m["exp_avg"].dtype for m in moments} == {torch.float32}


def test_a_pretrained_dir_that_is_not_a_whole_gpt2_is_refused(tmp_path, pretrained_dir):
    """transformers would start what the dir lacks at random, saying so only in a notice."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(bert)
    partial = tmp_path / "partial"
    shutil.copytree(pretrained_dir, partial)
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".h.1." not in k}, partial / "model.safetensors", {"format": "pt"})
    empty = tmp_path / "empty"
    empty.mkdir()
    errors, prepared = [], []
    for n, init in enumerate((bert, empty, partial, "no-such-model-xyz")):
        cache = tmp_path / f"cache-{n}"  # a token cache of its own: whether the data was prepared first
        result = run_cli(
            "gpt2exp.train",
            *FAST,
            f"model.init={init}",
            f"data.tokenizer.name={pretrained_dir}",
            cwd=tmp_path,
            env={"GPT2EXP_CACHE": str(cache)},
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        errors.append(result.stderr.strip().splitlines()[-1])
        prepared.append(cache.is_dir() and any(cache.iterdir()))
    assert prepared == [False, False, True, False]  # only the partial dir's weights need the job to read them
    assert errors == [
        f"error: model.init={bert} is a bert model, not GPT-2; pass a GPT-2 checkpoint (a hub name such as gpt2, "
        "or a dir saved with save_pretrained)",
        f"error: cannot load model from {empty}: no readable config.json ([Errno 2] No such file or directory: "
        f"'{empty}/config.json')",
        f"error: model.init={partial} lacks 12 of GPT-2's weights (transformer.h.1.attn.c_attn.bias, "
        "transformer.h.1.attn.c_attn.weight, transformer.h.1.attn.c_proj.bias, ...), which would start at random; "
        "pass a whole GPT-2 checkpoint",
        "error: model 'no-such-model-xyz' is not a local path, not in the local HF cache, and the Hugging Face hub "
        "cannot be reached (offline); pass a local path saved with save_pretrained, or go online",
    ]
    assert not (tmp_path / "outputs").exists()  # each launch took back its run dir


def test_a_config_dir_of_ones_own_adds_groups_and_experiments_to_runs_and_sweeps(tmp_path):
    """--config-dir is searched before gpt2exp's conf/ by the launcher's checks as by Hydra in the job: the
    launcher composed without it and refused +experiment=mine."""
    (tmp_path / "mine" / "experiment").mkdir(parents=True)
    (tmp_path / "mine" / "model").mkdir()
    (tmp_path / "mine" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: one_layer\ntrainer:\n  max_steps: 2\n"
    )
    (tmp_path / "mine" / "model" / "one_layer.yaml").write_text("defaults:\n  - gpt2_tiny\n  - _self_\nn_layer: 1\n")
    own = ["--config-dir", "mine", "+experiment=mine", *FAST[1:]]  # FAST less its model.n_layer
    run = run_cli("gpt2exp.train", *own, "hydra.run.dir=run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = run_cli("gpt2exp.train", "-m", *own, "seed=1,2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    for run_dir in (tmp_path / "run", tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"):
        record = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (record["model"]["n_layer"], record["trainer"]["max_steps"]) == (1, 2)
    errors = [
        run_cli("gpt2exp.train", *args, cwd=tmp_path).stderr
        for args in (["-cn", "mine"], ["--config-dir", "nowhere", "+experiment=mine"])
    ]
    assert errors == [
        "error: gpt2exp composes its own conf/config.yaml: --config-name and --config-path do not apply; add your "
        "own groups and experiments with --config-dir DIR (e.g. DIR/experiment/mine.yaml, +experiment=mine)\n",
        "error: --config-dir nowhere is not a directory; name the dir holding your config groups\n",
    ]


def test_gpt2_124m_starts_and_runs_a_step_on_cpu(tmp_path):
    """The GPU preset still runs on a CPU: bf16 autocast on CPU, compile skipped, one step."""
    result = run_cli(
        "gpt2exp.train",
        "+experiment=gpt2_124m",
        "trainer.max_steps=1",
        "trainer.batch_size=1",
        "trainer.grad_accum_steps=1",
        "trainer.eval_batches=1",
        "trainer.num_samples=0",
        "trainer.progress=false",
        "data.tokenizer.vocab_size=512",
        "logger=none",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    config = json.loads((run_dir / "checkpoints" / "step_00000001" / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (12, 12, 768, 1024)
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["step"] == 1 and 5.0 < row["train/loss"] < 8.0  # ~ln(512) at the start


def test_a_diverged_run_is_one_line_exit_3_and_marked_diverged(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "gpt2exp.train", *FAST, "optimizer.lr=1e3", "trainer.max_steps=30", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 3 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged at step ") and error.endswith("; lower optimizer.lr")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "diverged"


def test_a_save_that_fills_the_disk_is_one_line_exit_74_and_marked_failed(tmp_path):
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run_dir = disk / "run"
        result = run_cli(
            "gpt2exp.train", *FAST, "trainer.max_steps=4", "checkpoint.every_steps=2", f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 74, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [
            f"error: checkpoint step_00000002 was not saved: no space left on device (disk full) in "
            f"{run_dir / 'checkpoints'}; earlier checkpoints are intact; free space or fix permissions, then resume"
        ]
        assert "Traceback" not in result.stderr
        assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == []  # no partial dir left
    finally:
        subprocess.run(["umount", str(disk)], check=True)
