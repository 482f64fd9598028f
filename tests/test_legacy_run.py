"""A run dir written by gpt2exp 0.1.0 (tests/fixtures/run_v0_1) still resumes with today's code.

Only the command-line contract is used: `resume=`, run.json (status, resumes), metrics.jsonl and the
checkpoint layout (step dirs, `latest`, manifest.json, HF files).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0_1"


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_v0_1_run_dir_resumes_to_a_verified_loadable_checkpoint(tmp_path):
    from transformers import GPT2LMHeadModel

    run = tmp_path / "run_v0_1"
    shutil.copytree(FIXTURE, run)
    before = json.loads((run / "run.json").read_text())
    metrics_before = (run / "metrics.jsonl").read_text()
    assert before["status"] == "completed" and steps(run) == list(range(0, 7))

    # the recorded data.cache_dir was a temp dir that is gone: the tokenizer and tokens are rebuilt
    result = run_cli(
        "gpt2exp.train", f"resume={run}", "trainer.max_steps=9", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]

    info = json.loads((run / "run.json").read_text())
    assert info["run_id"] == before["run_id"] and info["status"] == "completed"
    assert [r["step"] for r in info["resumes"]] == [6]
    metrics = (run / "metrics.jsonl").read_text()
    assert metrics.startswith(metrics_before)  # the old rows untouched, the new ones after them, each step once
    assert steps(run) == list(range(0, 10))

    ckpt = run / "checkpoints" / "step_00000009"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000009"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    files = {p.name for p in ckpt.iterdir() if p.is_file()} - {"manifest.json"}
    assert set(manifest) == files
    for name, entry in manifest.items():
        data = (ckpt / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), name
    verify = run_cli("gpt2exp.ckpt", "verify", str(ckpt), cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    model = GPT2LMHeadModel.from_pretrained(ckpt)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (2, 32, 512)
    assert model.config.activation_function == "gelu_new"  # as 0.1 built it, not today's default

    # the run went on with the tokenizer it was trained with (here: the BPE retrained in the fresh cache)
    assert (ckpt / "tokenizer.json").read_bytes() == (FIXTURE / "tokenizer" / "tokenizer.json").read_bytes(), (
        "the resumed checkpoint's tokenizer differs from the one the run was trained with"
    )
