"""`python -m gpt2exp.ckpt list|verify`: the table, and a non-zero exit on corruption."""

from __future__ import annotations

import pytest

from tests.conftest import FAST, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ckpt")
    result = run_cli(
        "gpt2exp.train",
        *FAST,
        f"hydra.run.dir={cwd / 'run'}",
        "trainer.max_steps=9",
        "trainer.eval_every=3",
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=1",
        "checkpoint.keep_best=1",
        "checkpoint.keep_every=6",
        "optimizer.lr=3e-3",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


def test_list_shows_each_checkpoint_and_why_it_is_kept(run):
    result = run_cli("gpt2exp.ckpt", "list", str(run), cwd=run)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "saved", "size", "val/loss", "status", "kept", "because"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(table, key=int) == ["6", "9"]  # step 3 rotated away: not last, not best, not a milestone
    assert table["9"][-1].startswith("last") and "milestone" in table["6"][-1]
    assert all("verified" in row for row in table.values())


def test_verify_passes_then_fails_on_a_flipped_byte(run):
    ok = run_cli("gpt2exp.ckpt", "verify", str(run), cwd=run)
    assert ok.returncode == 0 and ok.stdout.splitlines() == ["step_00000006: ok", "step_00000009: ok"]
    weights = run / "checkpoints" / "step_00000009" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad = run_cli("gpt2exp.ckpt", "verify", str(run / "checkpoints" / "step_00000009"), cwd=run)
    assert bad.returncode == 1
    assert bad.stdout.strip() == "step_00000009: CORRUPT: model.safetensors fails its sha256 check"
    # verification never moves or deletes anything
    assert (run / "checkpoints" / "step_00000009").is_dir() and not (run / "checkpoints" / "corrupt").exists()


def test_bad_path_is_exit_2(tmp_path):
    result = run_cli("gpt2exp.ckpt", "verify", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: path does not exist: {tmp_path / 'nope'}; pass a run dir or a checkpoint dir"
    )
