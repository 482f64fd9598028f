"""What the checkpoint guarantees rest on that no run on a CPU shows end to end: the order of a commit's
fsyncs and renames, a background save's copy waited for before the next update, the RNG caches and
generators restored (forked per rank), a checkpoint's metrics of its own step, the first signal kept, a
write returned only once hashed, and the fast-tier twins of checks the slow tier makes (accumulation, a
resume with dropout, a completed run, a named corrupt checkpoint). Each fails if the line it guards is
removed."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gpt2exp.snapshot as snap
from gpt2exp.checkpoint import CheckpointManager
from gpt2exp.state import RngState
from tests.test_checkpoint import make_cfg, make_stateful, truncate

# -- durability order of one commit ---------------------------------------------------------------


class Events:
    def __init__(self, monkeypatch):
        self.log: list[tuple[str, str]] = []
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd):
            self.log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(a, b):
            self.log.append(("rename", f"{a} -> {b}"))
            real_rename(a, b)

        def replace(a, b):
            self.log.append(("replace", f"{a} -> {b}"))
            real_replace(a, b)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind, predicate):
        hits = [i for i, (k, what) in enumerate(self.log) if k == kind and predicate(what)]
        assert hits, (kind, self.log)
        return hits[0]


def test_a_commit_fsyncs_every_file_the_manifest_the_dirs_and_latest_in_order(tmp_path, monkeypatch):
    manager = CheckpointManager(make_cfg(), tmp_path / "run")
    stateful = make_stateful()
    root = manager.root
    events = Events(monkeypatch)
    final = manager.save(1, stateful, {}, force=True).wait()
    monkeypatch.undo()
    manager.close()
    tmp = f"{root}/.tmp-step_00000001-"
    names = json.loads((final / "manifest.json").read_text())["files"]
    manifest_sync = events.index("fsync", lambda p: p.startswith(tmp) and p.endswith("/manifest.json"))
    for name in names:  # every file durable before the manifest that vouches for it
        assert events.index("fsync", lambda p, n=name: p.startswith(tmp) and p.endswith("/" + n)) < manifest_sync
    tmp_dir_sync = events.index("fsync", lambda p: p.startswith(tmp) and "/" not in p[len(tmp) :])
    rename = events.index("rename", lambda w: w.endswith(f"-> {final}"))
    root_sync = events.index("fsync", lambda p: p == str(root))
    latest_sync = events.index("fsync", lambda p: p.startswith(f"{root}/.tmp-latest-"))
    latest_replace = events.index("replace", lambda w: w.endswith(f"-> {root}/latest"))
    last_root_sync = max(i for i, (k, p) in enumerate(events.log) if k == "fsync" and p == str(root))
    assert manifest_sync < tmp_dir_sync < rename < root_sync < latest_sync < latest_replace < last_root_sync


def test_a_quarantine_makes_its_move_durable(tmp_path, monkeypatch):
    manager = CheckpointManager(make_cfg(), tmp_path / "run")
    stateful = make_stateful()
    manager.save(1, stateful, {}, force=True)
    manager.save(2, stateful, {}, force=True)
    truncate(manager.root / "step_00000002" / "model.safetensors")
    events = Events(monkeypatch)
    manager.load(make_stateful(seed=3))
    monkeypatch.undo()
    manager.close()
    moved = events.index("replace", lambda w: "/corrupt/step_00000002-" in w)
    assert any(k == "fsync" and p == str(manager.root) for k, p in events.log[moved:])
    first_after = next(p for k, p in events.log[moved:] if k == "fsync")
    assert first_after == str(manager.root)  # the move itself, before `latest` is rewritten


def test_run_json_is_fsynced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    from gpt2exp.rundir import update_run_json

    events = Events(monkeypatch)
    update_run_json(tmp_path, status="running")
    monkeypatch.undo()
    sync = events.index("fsync", lambda p: "/.run.json.tmp-" in p)
    assert sync < events.index("replace", lambda w: w.endswith(f"-> {tmp_path}/run.json"))


# -- the snapshot copy is waited for before the state changes ---------------------------------------


def held_copy(monkeypatch):
    release = threading.Event()
    real = snap._copy_memory

    def slow_copy(pairs):
        assert release.wait(30)
        real(pairs)

    monkeypatch.setattr(snap, "_copy_memory", slow_copy)
    return release


def test_wait_copied_blocks_until_the_copy_is_done(monkeypatch):
    release = held_copy(monkeypatch)
    snapshot = snap.HostSnapshot()
    tensors = {"w": torch.arange(1000, dtype=torch.float32)}
    buffers, _ = snapshot.start(tensors)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (snapshot.wait_copied(), done.set()))
    waiter.start()
    time.sleep(0.3)
    assert not done.is_set()  # the training side is held while the copy runs
    release.set()
    waiter.join(30)
    assert done.is_set() and torch.equal(buffers["w"], tensors["w"])
    snapshot.close()


def test_trainer_step_waits_for_a_background_save_copy_before_the_update(compose, tmp_path, monkeypatch):
    from gpt2exp.resume import fix_values_of_record
    from gpt2exp.trainer import Trainer
    from tests.conftest import FAST

    (tmp_path / "run").mkdir()
    cfg = fix_values_of_record(compose([*FAST, "trainer.max_steps=4", "checkpoint.async_save=true"]), 1)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.step()
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    release = held_copy(monkeypatch)
    pending = trainer.checkpoints.save(1, trainer.stateful, {}, force=True)
    stepper = threading.Thread(target=trainer.step)
    stepper.start()
    time.sleep(0.5)
    assert stepper.is_alive()  # held at wait_snapshot, before optimizer.step
    release.set()
    stepper.join(60)
    written = load_file(pending.wait() / "model.safetensors")
    trainer.checkpoints.close()
    assert all(torch.equal(written[k], expected[k]) for k in written)


# -- RNG fidelity --------------------------------------------------------------------------------


def test_rng_restores_the_cached_gaussians_of_python_and_numpy():
    random.gauss(0, 1)  # python caches the second of a pair
    np.random.randn()  # numpy's legacy generator too (has_gauss)
    saved = json.loads(json.dumps(RngState().state_dict()))
    draws = (random.gauss(0, 1), float(np.random.randn()))
    RngState().load_state_dict(saved)
    assert (random.gauss(0, 1), float(np.random.randn())) == draws


def test_rng_restores_the_cuda_generators(monkeypatch):
    saved_states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    state = json.loads(json.dumps(RngState().state_dict()))
    assert state["cuda"] == [[1, 2, 3], [4, 5, 6]]
    RngState().load_state_dict(state)
    assert [t.tolist() for t in restored] == [[1, 2, 3], [4, 5, 6]]


# -- the trainer ------------------------------------------------------------------------------


@pytest.fixture
def make_trainer(compose, tmp_path):
    from gpt2exp.resume import fix_values_of_record
    from gpt2exp.trainer import Trainer
    from tests.conftest import FAST

    def make(name: str, *overrides: str) -> Trainer:
        (tmp_path / name).mkdir(exist_ok=True)
        cfg = fix_values_of_record(compose([*FAST, "trainer.max_steps=4", "trainer.eval_every=2", *overrides]), 1)
        return Trainer(cfg, tmp_path / name)

    return make


def test_accumulating_two_micro_batches_equals_one_batch_of_both(make_trainer):
    whole = make_trainer("whole", "trainer.batch_size=8", "trainer.grad_accum_steps=1")
    split = make_trainer("split", "trainer.batch_size=4", "trainer.grad_accum_steps=2")
    assert whole.step() == pytest.approx(split.step(), abs=1e-5)
    a, b = whole.model.state_dict(), split.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_a_resumed_trainer_with_dropout_ends_with_the_straight_weights(make_trainer, tmp_path):
    from gpt2exp.resume import ResumeTarget

    args = ("model.dropout=0.1", "checkpoint.every_steps=2", "trainer.num_samples=0", "checkpoint.keep_last=-1")
    make_trainer("straight", *args).run(None)
    make_trainer("cut", *args, "trainer.max_steps=2", "scheduler.decay_steps=4").run(None)
    make_trainer("cut", *args).run(ResumeTarget(tmp_path / "cut", None))
    ours = load_file(tmp_path / "cut" / "checkpoints" / "step_00000004" / "model.safetensors")
    theirs = load_file(tmp_path / "straight" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_checkpoint_records_only_the_metrics_evaluated_at_its_step(make_trainer, tmp_path):
    trainer = make_trainer(
        "run", "trainer.max_steps=3", "checkpoint.every_steps=1", "trainer.num_samples=0", "checkpoint.keep_last=-1"
    )
    trainer.run(None)
    root = tmp_path / "run" / "checkpoints"
    metrics = {p.name: json.loads((p / "manifest.json").read_text())["metrics"] for p in root.glob("step_*")}
    assert metrics["step_00000001"] == {} and set(metrics["step_00000002"]) == {"val/loss"}


# -- signals --------------------------------------------------------------------------------------


def test_a_second_signal_changes_nothing_and_the_first_ones_handler_gets_it():
    from gpt2exp.preemption import PreemptionFlag

    got = []
    before = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with PreemptionFlag() as flag:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert (flag.signal_name, flag.signum) == ("SIGUSR1", signal.SIGUSR1)
            flag.hand_over()
        assert got == [signal.SIGUSR1]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_hand_over_of_sigint_does_not_raise_keyboard_interrupt():
    from gpt2exp.preemption import PreemptionFlag

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with PreemptionFlag() as flag:
            os.kill(os.getpid(), signal.SIGINT)
        try:
            flag.hand_over()  # Python's own SIGINT handler would raise KeyboardInterrupt here
        except KeyboardInterrupt:
            pytest.fail("hand_over called Python's default SIGINT handler")
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_of_a_run_completed_at_max_steps_is_refused(tmp_path):
    from gpt2exp.resume import RunComplete, refuse_complete

    (tmp_path / "run.json").write_text(json.dumps({"status": "completed", "step": 4}))
    with pytest.raises(RunComplete, match="is complete at step 4"):
        refuse_complete(tmp_path, 4)
    refuse_complete(tmp_path, 5)


def test_a_named_checkpoint_that_fails_verification_is_refused_not_replaced(tmp_path):
    from gpt2exp.checkpoint import CheckpointError

    manager = CheckpointManager(make_cfg(), tmp_path / "run")
    stateful = make_stateful()
    manager.save(1, stateful, {}, force=True)
    named = manager.save(2, stateful, {}, force=True).wait()
    truncate(named / "model.safetensors")
    fresh = make_stateful(seed=3)
    before = {k: v.clone() for k, v in fresh["model"].state_dict().items()}
    with pytest.raises(CheckpointError, match="step_00000002"):
        manager.load(fresh, named)
    manager.close()
    assert all(torch.equal(v, before[k]) for k, v in fresh["model"].state_dict().items())
    assert fresh["trainer"].step == 1 and fresh["trainer"].tokens_seen == 32  # make_stateful's, not step 1's load


def test_forked_rngs_differ_between_ranks_and_repeat_for_a_rank():
    state = RngState().state_dict()
    draws = {}
    for rank in (1, 2, 1):
        RngState().load_forked(state, rank)
        draws.setdefault(rank, []).append(torch.rand(4))
    assert torch.equal(draws[1][0], draws[1][1]) and not torch.equal(draws[1][0], draws[2][0])


def test_a_write_returns_only_once_its_bytes_are_hashed(tmp_path, monkeypatch):
    import hashlib

    from gpt2exp.checkpoint_files import HashingFile, io_pool

    hashed = []

    class SlowDigest:
        def __init__(self):
            self.inner = hashlib.sha256()

        def update(self, data):
            time.sleep(0.2)
            self.inner.update(data)
            hashed.append(len(data))

        def hexdigest(self):
            return self.inner.hexdigest()

    with io_pool() as pool:
        out = HashingFile(tmp_path / "f.bin", pool)
        out._digest = SlowDigest()
        piece = bytearray(os.urandom(1 << 17))
        out.write(piece)
        assert hashed == [1 << 17]  # the caller may reuse `piece` now
        piece[:] = b"\0" * len(piece)
        out.finish()


def test_the_background_writer_writes_only_once_the_copy_is_on_the_host(tmp_path, monkeypatch):
    manager = CheckpointManager(make_cfg(async_save=True), tmp_path / "run")
    stateful = make_stateful()
    expected = {k: v.clone() for k, v in stateful["model"].state_dict().items()}
    release = held_copy(monkeypatch)
    pending = manager.save(1, stateful, {}, force=True)
    time.sleep(0.3)
    assert not pending.done and not (manager.root / "step_00000001").exists()
    release.set()
    written = load_file(pending.wait() / "model.safetensors")
    manager.close()
    assert all(torch.equal(written[k], expected[k]) for k in written)
