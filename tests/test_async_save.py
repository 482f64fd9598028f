"""Background checkpoint saves (checkpoint.async_save): the loop only waits for a copy of the state.

The same tiny GPT-2 and stateful set as tests/test_checkpoint.py. The writer is held back with an
event where a test needs a save to stay in flight while training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import gpt2exp.checkpoint as ckpt
from gpt2exp.checkpoint import CheckpointManager, verify_checkpoint
from gpt2exp.errors import SaveFailed
from tests.test_checkpoint import REPO, leftovers, make_cfg, make_stateful, steps

TENSOR_FILES = ("model.safetensors", "optimizer.pt")


def train_step(stateful: dict, manager: CheckpointManager | None = None) -> None:
    """One optimizer step on the stateful set, as Trainer.step does it (waiting for a snapshot first)."""
    model, optimizer = stateful["model"], stateful["optimizer"].obj
    x, y = stateful["sampler"].next_batch()
    model(input_ids=torch.from_numpy(x), labels=torch.from_numpy(y)).loss.backward()
    if manager is not None:
        manager.wait_snapshot()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stateful["trainer"].step += 1


class HeldWriter:
    """Holds the background writer until released: the save stays in flight."""

    def __init__(self, manager: CheckpointManager):
        self.release = threading.Event()
        self.started = threading.Event()
        real_write = manager.files.write

        def held_write(*args, **kwargs):
            self.started.set()
            assert self.release.wait(30), "the test never released the writer"
            return real_write(*args, **kwargs)

        manager.files.write = held_write


@pytest.fixture
def manager_pair(tmp_path):
    """A synchronous and a background manager over two identical stateful sets."""
    made = []

    def make(**cfg):
        sync = CheckpointManager(make_cfg(async_save=False, **cfg), tmp_path / "sync")
        background = CheckpointManager(make_cfg(async_save=True, **cfg), tmp_path / "async")
        made.extend([sync, background])
        return sync, background

    yield make
    for manager in made:
        manager.close()


def test_a_background_save_equals_a_sync_save_byte_for_byte_while_training_changes_the_weights(manager_pair):
    sync, background = manager_pair()
    a, b = make_stateful(seed=3), make_stateful(seed=3)
    for stateful in (a, b):
        torch.manual_seed(7)  # the same dropout masks for both
        train_step(stateful)
    expected = sync.save(2, a, {"val/loss": 1.5}, force=True).wait()

    held = HeldWriter(background)
    pending = background.save(2, b, {"val/loss": 1.5}, force=True)
    assert held.started.wait(30)
    before = {k: v.clone() for k, v in b["model"].state_dict().items()}
    for _ in range(3):  # training goes on: the weights change while the save is in flight
        train_step(b, background)
    assert not pending.done
    assert any(not torch.equal(v, before[k]) for k, v in b["model"].state_dict().items())
    held.release.set()
    written = pending.wait()

    assert written == background.root / "step_00000002"
    for name in TENSOR_FILES:
        assert (written / name).read_bytes() == (expected / name).read_bytes(), name
    state, expected_state = (json.loads((d / "trainer_state.json").read_text()) for d in (written, expected))
    assert state.pop("saved_at") and expected_state.pop("saved_at")
    assert state == expected_state  # the step's counters, sampler position and RNG, not the later ones
    assert verify_checkpoint(written) is None


def test_a_forced_save_of_the_step_a_background_save_is_writing_waits_for_it_and_writes_nothing_again(manager_pair):
    """A signal (or a pruned trial) right after the periodic save of the same step: one checkpoint, no error."""
    _, background = manager_pair(every_steps=2)
    stateful = make_stateful()
    held = HeldWriter(background)
    periodic = background.save(2, stateful, {}, force=False)
    assert held.started.wait(30) and not periodic.done
    threading.Timer(0.2, held.release.set).start()
    forced = background.save(2, stateful, {}, force=True)
    assert forced.done and forced.wait() == periodic.wait() == background.root / "step_00000002"
    assert steps(background.root) == {"step_00000002"} and verify_checkpoint(periodic.wait()) is None


def test_one_save_in_flight_at_most_and_its_buffers_are_reused(manager_pair):
    _, background = manager_pair()
    stateful = make_stateful()
    held = HeldWriter(background)
    first = background.save(1, stateful, {}, force=True)
    assert held.started.wait(30)
    buffers = {name: t.data_ptr() for name, t in background._snapshot._buffers.items()}

    second_returned = threading.Event()

    def second_save():
        background.save(2, stateful, {}, force=True)
        second_returned.set()

    thread = threading.Thread(target=second_save)
    thread.start()
    time.sleep(0.3)
    assert not second_returned.is_set() and not first.done  # the second waits for the first
    held.release.set()
    thread.join(30)
    assert second_returned.is_set()
    background.flush()
    assert steps(background.root) == {"step_00000001", "step_00000002"}
    assert {name: t.data_ptr() for name, t in background._snapshot._buffers.items()} == buffers


def test_close_waits_for_the_save_in_flight(manager_pair):
    _, background = manager_pair()
    held = HeldWriter(background)
    background.save(1, make_stateful(), {}, force=True)
    threading.Timer(0.3, held.release.set).start()
    background.close()
    assert steps(background.root) == {"step_00000001"} and leftovers(background.root) == []


def test_a_failed_background_save_is_raised_at_the_next_step_boundary(manager_pair, monkeypatch):
    _, background = manager_pair(keep_last=5)
    stateful = make_stateful()
    background.save(1, stateful, {}, force=True).wait()

    def disk_full(path, data, hasher):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_file", disk_full)
    pending = background.save(2, stateful, {}, force=True)
    while not pending.done:
        time.sleep(0.01)
    with pytest.raises(SaveFailed) as caught:
        background.poll()
    assert str(caught.value) == (
        f"checkpoint step_00000002 was not saved: no space left on device (disk full) in {background.root}; "
        "earlier checkpoints are intact; free space or fix permissions, then resume"
    )
    assert steps(background.root) == {"step_00000001"} and leftovers(background.root) == []
    background.poll()  # reported once


def test_with_on_save_error_warn_a_failed_background_save_only_warns(manager_pair, monkeypatch, caplog):
    _, background = manager_pair(on_save_error="warn")
    monkeypatch.setattr(ckpt, "write_file", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with caplog.at_level(logging.WARNING, logger="gpt2exp.checkpoint"):
        assert background.save(1, make_stateful(), {}, force=True).wait() is None
        background.poll()
    assert "training goes on: checkpoint.on_save_error=warn" in caplog.text
    assert steps(background.root) == set()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import gpt2exp.checkpoint as ckpt
    from tests.test_checkpoint import bump, make_cfg, make_stateful

    stateful = make_stateful()
    manager = ckpt.CheckpointManager(make_cfg(async_save=True), sys.argv[1])
    manager.save(1, stateful, {}, force=True).wait()
    print("saved step 1", flush=True)
    real_write_file = ckpt.write_file

    def write_file_then_die(path, data, hasher):
        if path.name == ckpt.OPTIMIZER_FILE:  # in the background writer, mid-checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write_file(path, data, hasher)

    ckpt.write_file = write_file_then_die
    bump(stateful["model"])
    stateful["trainer"].step = 2
    manager.save(2, stateful, {}, force=True).wait()
    print("step 2 survived the kill", flush=True)
    """
)


def test_sigkill_during_a_background_write_leaves_the_previous_checkpoint_the_newest_good_one(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "saved step 1\n"
    root = run_dir / "checkpoints"
    assert steps(root) == {"step_00000001"} and (root / "latest").read_text() == "step_00000001\n"
    assert [name.startswith(".tmp-step_00000002-") for name in leftovers(root)] == [True]
    manager = CheckpointManager(make_cfg(async_save=True), run_dir)  # a restart cleans up and loads step 1
    try:
        assert leftovers(root) == []
        assert manager.load(make_stateful(seed=9)).step == 1
    finally:
        manager.close()
