"""The Trainer in process: built whole in __init__, one optimizer step per step(), run.json's final status."""

from __future__ import annotations

import errno
import json
import logging
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from gpt2exp.errors import SaveFailed
from gpt2exp.resume import ResumeTarget, fix_values_of_record, refuse_complete
from gpt2exp.trainer import Preempted, Trainer
from tests.conftest import FAST


@pytest.fixture
def make_trainer(compose, tmp_path):
    def make(*overrides: str) -> Trainer:
        cfg = fix_values_of_record(compose([*FAST, "trainer.max_steps=4", "trainer.eval_every=2", *overrides]), 1)
        return Trainer(cfg, tmp_path / "run")

    (tmp_path / "run").mkdir()
    return make


def test_step_is_one_optimizer_step_over_the_global_batch(make_trainer):
    trainer = make_trainer("trainer.grad_accum_steps=2")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss = trainer.step()
    assert trainer.counters.step == 1
    assert trainer.counters.tokens_seen == 4 * 2 * 32  # batch_size x grad_accum_steps x block_size
    assert trainer.sampler.state_dict()["offset"] == 2 * 4  # two micro-batches of 4 windows drawn
    assert 5.0 < loss < 7.5  # ~ln(512) for an untrained model
    changed = [k for k, v in trainer.model.state_dict().items() if not v.equal(before[k])]
    assert "transformer.h.0.attn.c_attn.weight" in changed


def test_everything_the_loop_uses_is_built_in_init(make_trainer):
    trainer = make_trainer()
    built = set(vars(trainer))
    trainer.run(None)
    assert set(vars(trainer)) == built


def test_a_run_logs_each_step_once_and_saves_the_last(make_trainer):
    trainer = make_trainer("trainer.log_every=1")
    val_loss = trainer.run(None)
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert [("val/loss" in row) for row in rows] == [True, False, True, False, True]
    assert rows[-1]["val/loss"] == val_loss
    assert json.loads((trainer.run_dir / "run.json").read_text())["status"] == "completed"
    assert (trainer.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_run_json_says_failed_when_the_wandb_start_fails(make_trainer, monkeypatch):
    trainer = make_trainer()

    def no_wandb(*args, **kwargs):
        raise RuntimeError("W&B could not start")

    monkeypatch.setattr(trainer.tracker, "start_wandb", no_wandb)
    with pytest.raises(RuntimeError, match="W&B could not start"):
        trainer.run(None)
    info = json.loads((trainer.run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "ended_at" in info


def test_run_json_says_failed_when_the_first_evaluation_fails(make_trainer, monkeypatch):
    trainer = make_trainer()

    def broken_eval():
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(trainer, "evaluate", broken_eval)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        trainer.run(None)
    assert json.loads((trainer.run_dir / "run.json").read_text())["status"] == "failed"
    assert trainer.counters.step == 0


def test_a_nan_loss_stops_as_diverged(make_trainer, monkeypatch):
    from gpt2exp.errors import Diverged

    trainer = make_trainer()
    monkeypatch.setattr(trainer, "step", lambda: float("nan"))
    with pytest.raises(Diverged, match="training diverged at step 0 \\(loss nan\\); lower optimizer.lr"):
        trainer.run(None)
    assert json.loads((trainer.run_dir / "run.json").read_text())["status"] == "diverged"


def test_mfu_is_logged_beside_tokens_per_s_where_the_peak_is_known(make_trainer):
    cpu = make_trainer("trainer.log_every=1")
    assert cpu.peak_flops is None
    cpu.run(None)
    assert all("mfu" not in json.loads(line) for line in (cpu.run_dir / "metrics.jsonl").read_text().splitlines())


def test_mfu_is_tokens_per_s_times_flops_per_token_over_the_peak(make_trainer, tmp_path):
    trainer = make_trainer("trainer.log_every=1")
    trainer.peak_flops = 1e9  # as a GPU in the table would give
    trainer.run(None)
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "tokens_per_s" in row]
    assert len(logged) == 4
    for row in logged:
        assert row["mfu"] == row["tokens_per_s"] * trainer.flops_per_token / 1e9


def test_mfu_is_each_devices_share_of_the_worlds_tokens_against_its_own_peak(make_trainer, monkeypatch):
    """tokens_per_s counts every rank's tokens (the global batch); each device runs 1/world.size of them."""
    from dataclasses import replace

    trainer = make_trainer("trainer.log_every=1")
    trainer.peak_flops = 1e9
    trainer.world = replace(trainer.world, size=2)  # as rank 0 of 2 processes sees it
    logged = []
    monkeypatch.setattr(trainer.tracker, "log", lambda step, row: logged.append(row))
    with trainer.clock.timing(2048):
        time.sleep(0.01)
    trainer.counters.step = 1
    trainer.log_if_due(5.0)
    (row,) = logged
    assert row["mfu"] == row["tokens_per_s"] / 2 * trainer.flops_per_token / 1e9


def test_deterministic_kernels_are_on_for_a_deterministic_run_only_and_train_the_same_on_a_cpu(
    make_trainer, monkeypatch
):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        deterministic = make_trainer("trainer.deterministic=true")
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's reproducible workspace
        losses = [deterministic.step() for _ in range(2)]
        plain = make_trainer()
        assert not torch.are_deterministic_algorithms_enabled()
        assert [plain.step() for _ in range(2)] == losses  # a CPU run is already bit-exact
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_model_pads_its_vocabulary_to_the_multiple(make_trainer):
    trainer = make_trainer("data.tokenizer.vocab_size=300")
    assert (trainer.data.vocab_size, trainer.model.config.vocab_size) == (300, 320)
    assert trainer.cfg.model.vocab_multiple == 64
    assert 5.0 < trainer.step() < 6.5  # ~ln(320): the extra rows take part in the softmax


def test_the_first_step_makes_the_background_save_buffers_and_the_first_save_copies_into_them(make_trainer):
    trainer = make_trainer("checkpoint.async_save=true")
    snapshot = trainer.checkpoints._snapshot
    assert snapshot._buffers == {}
    trainer.step()
    moments = sum(len(state) for state in trainer.optimizer.state.values())  # AdamW: step, exp_avg, exp_avg_sq
    assert moments == 3 * len(list(trainer.model.parameters()))
    weights = len(trainer.model.state_dict()) - 1  # lm_head.weight is wte's
    assert len(snapshot._buffers) == weights + moments
    reserved = {name: buffer.data_ptr() for name, buffer in snapshot._buffers.items()}
    trainer.step()
    assert {name: buffer.data_ptr() for name, buffer in snapshot._buffers.items()} == reserved  # made once
    pending = trainer.checkpoints.save(2, trainer.stateful, {}, force=True)
    trainer.step()
    written = pending.wait()
    assert {name: buffer.data_ptr() for name, buffer in snapshot._buffers.items()} == reserved
    trainer.checkpoints.close()
    saved = load_file(written / "model.safetensors")
    assert saved.keys() == {k for k in trainer.model.state_dict() if k != "lm_head.weight"}


@pytest.mark.parametrize("async_save", ["true", "false"])
def test_a_signal_whose_save_fails_under_on_save_error_warn_says_the_step_was_not_saved(
    make_trainer, monkeypatch, caplog, async_save
):
    trainer = make_trainer("checkpoint.on_save_error=warn", f"checkpoint.async_save={async_save}")
    trainer.step()
    trainer.step()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.checkpoints.files, "write", disk_full)
    trainer.preemption.signal_name = "SIGTERM"  # as its handler records a signal
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpt2exp"), pytest.raises(Preempted):
        trainer.stop_if_asked()
    trainer.checkpoints.close()
    assert len(caplog.messages) == 2
    assert caplog.messages[0].startswith("checkpoint step_00000002 was not saved: no space left on device (disk full)")
    assert caplog.messages[1] == (
        "SIGTERM received: step 2 was not saved, a resume goes on from the newest checkpoint, stopping (exit 75)"
    )


def test_a_final_save_that_on_save_error_warn_let_fail_fails_the_run_and_a_resume_finishes_it(make_trainer, tmp_path):
    """warn lets training go on past a failed save; after the last step none follows, so the run is not complete."""
    overrides = ("checkpoint.on_save_error=warn", "checkpoint.every_steps=2", "trainer.num_samples=0")
    make_trainer(*overrides).run(None)
    (tmp_path / "run").rename(tmp_path / "whole")
    (tmp_path / "run").mkdir()
    trainer = make_trainer(*overrides)
    write = trainer.checkpoints.files.write

    def disk_full_at_step_4(tmp_dir, step, *args):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(tmp_dir, step, *args)

    trainer.checkpoints.files.write = disk_full_at_step_4
    with pytest.raises(SaveFailed) as failed:
        trainer.run(None)
    assert str(failed.value) == (
        "the final checkpoint (step 4) was not saved; earlier checkpoints are intact: free space or fix "
        f"permissions, then resume={trainer.run_dir} finishes the run from the newest one"
    )
    assert failed.value.exit_code == 74
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert json.loads((trainer.run_dir / "run.json").read_text())["status"] == "failed"

    refuse_complete(trainer.run_dir, 4)  # not complete: a resume goes on from step 2
    make_trainer(*overrides).run(ResumeTarget(trainer.run_dir, None))
    assert json.loads((trainer.run_dir / "run.json").read_text())["status"] == "completed"
    final = load_file(trainer.run_dir / "checkpoints" / "step_00000004" / "model.safetensors")
    reference = load_file(tmp_path / "whole" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert final.keys() == reference.keys()
    assert all(final[k].equal(reference[k]) for k in reference)
