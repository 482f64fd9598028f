"""A requeued job reruns its original command with resume=auto: values the config of record holds as
they ran (compile off on a CPU) are no change against what that command asked for."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, run_cli

pytestmark = pytest.mark.slow


def test_the_original_command_requeued_with_resume_auto_continues_although_compile_was_recorded_off(tmp_path):
    run_dir = tmp_path / "run"
    command = [*FAST, "trainer.compile=true", "checkpoint.every_steps=2", f"hydra.run.dir={run_dir}", "resume=auto"]
    first = run_cli("gpt2exp.train", *command, "trainer.max_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "compile: false" in (run_dir / "config.yaml").read_text()
    requeued = run_cli("gpt2exp.train", *command, "trainer.max_steps=4", cwd=tmp_path)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and [r["step"] for r in info["resumes"]] == [2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_asking_for_another_value_of_such_a_key_is_still_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli("gpt2exp.train", *FAST, "trainer.max_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    refused = run_cli("gpt2exp.train", *FAST, "trainer.compile=true", f"resume={run_dir}", cwd=tmp_path)
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith("error: resume cannot change trainer.compile (recorded False)")
    )
