"""CheckpointManager: atomic saves, exact rotation, verified loads, and failures that lose nothing.

Every test uses a tiny real GPT-2 (1 layer, 16-dim, 64-token vocabulary), an AdamW optimizer that
has taken a step (so it has state), and the small stateful objects the trainer checkpoints.
`save` hands back a PendingSave; `.wait()` gives the committed dir.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import gpt2exp.checkpoint as ckpt
from gpt2exp.checkpoint import (
    CheckpointError,
    CheckpointManager,
    HFCheckpointFiles,
    check_loadable,
    verify_checkpoint,
)
from gpt2exp.config import CheckpointConfig
from gpt2exp.data import BatchSampler
from gpt2exp.errors import EXIT_SAVE_FAILED, SaveFailed, UserError
from gpt2exp.state import RngState, TensorState, TrainerCounters

TINY = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
    "n_positions": 16,
    "vocab_size": 64,
    "bos_token_id": 63,
    "eos_token_id": 63,
}
CHECKPOINT_FILES = {"model.safetensors", "config.json", "optimizer.pt", "trainer_state.json", "manifest.json"}
REPO = Path(__file__).resolve().parent.parent
CHECKPOINT_YAML = REPO / "conf" / "checkpoint" / "default.yaml"


# -- helpers -------------------------------------------------------------------------------------


def make_cfg(**kwargs):
    """The checkpoint section of the default config (conf/checkpoint/default.yaml), with `kwargs` over it.

    Synchronous saves unless asked: these tests pin the commit protocol; tests/test_async_save.py
    runs the same protocol in the background.
    """
    kwargs.setdefault("async_save", False)
    kwargs.setdefault("keep_last", 100)
    kwargs.setdefault("keep_best", 0)
    return OmegaConf.merge(OmegaConf.structured(CheckpointConfig), OmegaConf.load(CHECKPOINT_YAML), kwargs)


def make_model(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**TINY, **overrides}))


def make_sampler(seed: int = 0, batches: int = 0) -> BatchSampler:
    tokens = (np.arange(2048) * 7 % TINY["vocab_size"]).astype(np.uint16)
    sampler = BatchSampler(tokens, block_size=8, batch_size=2, seed=seed)
    for _ in range(batches):
        sampler.next_batch()
    return sampler


def make_stateful(seed: int = 0, **overrides) -> dict:
    """model, optimizer (one step taken), counters, sampler (two batches in), rng, like Trainer."""
    model = make_model(seed, **overrides)
    # two parameter groups, as gpt2exp's optimizer has: their state_dict shares one `betas` tuple
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}], lr=1e-2
    )
    sampler = make_sampler(seed, batches=1)
    x, y = sampler.next_batch()
    loss = model(input_ids=torch.from_numpy(x), labels=torch.from_numpy(y)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    counters = TrainerCounters(step=1, tokens_seen=32)
    return {
        "model": model,
        "optimizer": TensorState(optimizer),
        "sampler": sampler,
        "trainer": counters,
        "rng": RngState(),
    }


def clone_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights_equal(model, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def bump(model, amount: float = 1.0) -> None:
    """Change every weight so that checkpoints of different steps are told apart."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def dirs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


def steps(root: Path) -> set[str]:
    return {name for name in dirs(root) if name.startswith("step_")}


def latest(root: Path) -> str:
    return (root / "latest").read_text()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, by: int = 100) -> None:
    os.truncate(path, path.stat().st_size - by)


def rewrite_manifest_entry(checkpoint: Path, name: str) -> None:
    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    file = checkpoint / name
    manifest["files"][name] = {"size": file.stat().st_size, "sha256": sha256(file)}
    manifest_path.write_text(json.dumps(manifest, indent=1))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def managers():
    """managers(cfg, run_dir) -> a CheckpointManager closed at teardown."""
    made: list[CheckpointManager] = []

    def make(cfg, run_dir, tokenizer_dir=None) -> CheckpointManager:
        manager = CheckpointManager(cfg, run_dir, tokenizer_dir)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


@pytest.fixture
def two_steps(run_dir, managers):
    """Checkpoints at steps 1 and 2 with different weights; returns (manager, stateful, weights by step)."""
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    weights = {}
    for step in (1, 2):
        stateful["trainer"].step = step
        weights[step] = clone_weights(stateful["model"])
        manager.save(step, stateful, {"val/loss": 3.0 - step}, force=True)
        bump(stateful["model"])
    return manager, stateful, weights


# -- writing one file: hashed beside the write, written back while it is written -------------------

MIB = 1 << 20


def write_pieces(pieces: list[bytes]):
    def write(out) -> None:
        for piece in pieces:
            out.write(piece)

    return write


def test_a_large_file_is_written_back_in_pieces_while_it_is_written(tmp_path, monkeypatch):
    import threading

    from gpt2exp.checkpoint_files import HashingFile, io_pool, write_file

    monkeypatch.setattr(HashingFile, "SYNC_EVERY", MIB)
    sizes_at_sync: list[int] = []
    first_sync = threading.Event()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        sizes_at_sync.append(os.fstat(fd).st_size)
        first_sync.set()
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    pieces = [os.urandom(MIB) for _ in range(8)]

    def write(out) -> None:
        out.write(pieces[0])
        assert first_sync.wait(timeout=30)  # the write-back of the first MiB began before the rest is written
        for piece in pieces[1:]:
            out.write(piece)

    with io_pool() as pool:
        entry = write_file(tmp_path / "big.bin", write, pool)
    data = b"".join(pieces)
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (tmp_path / "big.bin").read_bytes() == data
    assert sizes_at_sync[0] == MIB
    assert sizes_at_sync == sorted(sizes_at_sync) and sizes_at_sync[-1] <= len(data)


def test_a_failed_write_back_is_the_disks_error_and_the_file_is_closed(tmp_path, monkeypatch):
    from gpt2exp.checkpoint_files import HashingFile, io_pool, write_file

    monkeypatch.setattr(HashingFile, "SYNC_EVERY", MIB)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", disk_full)
    open_before = len(os.listdir("/proc/self/fd"))
    with io_pool() as pool, pytest.raises(OSError) as raised:
        write_file(tmp_path / "big.bin", write_pieces([os.urandom(MIB) for _ in range(4)]), pool)
    assert raised.value.errno == errno.ENOSPC
    assert len(os.listdir("/proc/self/fd")) == open_before


# -- save / load round trip ----------------------------------------------------------------------


def test_round_trip_restores_model_optimizer_and_state_exactly(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    src = make_stateful(seed=1)
    src["trainer"].load_state_dict(
        {"step": 7, "tokens_seen": 224, "last_eval": {"val/loss": 2.5, "step": 7}, "wandb_id": "w1"}
    )
    saved_weights = clone_weights(src["model"])
    saved_opt = src["optimizer"].state_dict()
    saved_sampler = src["sampler"].state_dict()
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)

    path = manager.save(7, src, {"val/loss": 2.5}, force=True).wait()
    assert path == manager.root / "step_00000007"
    # what a resumed run must draw next: the draws right after the RNG state was captured
    draws = (random.random(), float(np.random.rand()), torch.rand(3))

    dst = make_stateful(seed=2)
    dst["sampler"] = make_sampler(seed=1, batches=7)  # the run's own seed (config of record), elsewhere
    assert not torch.equal(dst["model"].transformer.wte.weight, saved_weights["transformer.wte.weight"])
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    loaded = manager.load(dst)

    assert loaded.path == path
    assert loaded.step == 7
    assert loaded.trainer_state["metrics"] == {"val/loss": 2.5}
    assert_weights_equal(dst["model"], saved_weights)
    model = dst["model"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied

    loaded_opt = dst["optimizer"].state_dict()
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    assert set(loaded_opt["state"]) == set(saved_opt["state"]) and len(saved_opt["state"]) == 16
    for index, state in saved_opt["state"].items():
        assert set(loaded_opt["state"][index]) == {"step", "exp_avg", "exp_avg_sq"}
        for key, tensor in state.items():
            assert torch.equal(loaded_opt["state"][index][key], tensor), (index, key)

    assert dst["trainer"] == src["trainer"]
    assert dst["trainer"].step == 7 and dst["trainer"].last_eval == {"val/loss": 2.5, "step": 7}
    assert saved_sampler == {"seed": 1, "epoch": 0, "offset": 4, **src["sampler"].data_identity()}
    assert dst["sampler"].state_dict() == saved_sampler and saved_sampler["windows"] == 255
    assert dst["sampler"].next_batch()[0].tolist() == src["sampler"].next_batch()[0].tolist()
    after = (random.random(), float(np.random.rand()), torch.rand(3))
    assert after[:2] == draws[:2] and torch.equal(after[2], draws[2])


def test_checkpoint_dir_loads_with_from_pretrained(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    path = manager.save(3, stateful, {}, force=True).wait()
    model = GPT2LMHeadModel.from_pretrained(path)
    assert model.config.n_embd == 16 and model.config.n_layer == 1 and model.config.vocab_size == 64
    assert_weights_equal(model, clone_weights(stateful["model"]))


def test_manifest_lists_every_file_with_size_and_sha256(run_dir, managers, tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    (tokenizer_dir / "special_tokens_map.json").write_text("{}")
    manager = managers(make_cfg(), run_dir, tokenizer_dir)
    path = manager.save(12, make_stateful(), {"val/loss": 1.25}, force=True).wait()

    on_disk = {p.name for p in path.iterdir()}
    assert on_disk == CHECKPOINT_FILES | {"tokenizer.json", "special_tokens_map.json"}
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["step"] == 12 and manifest["metrics"] == {"val/loss": 1.25}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry == {"size": (path / name).stat().st_size, "sha256": sha256(path / name)}, name
    assert (path / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert verify_checkpoint(path) is None
    assert ckpt.checkpoint_size(path) == sum((path / n).stat().st_size for n in manifest["files"])


def test_latest_names_the_newest_and_no_temp_dirs_remain(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    for step in (5, 6, 10):
        manager.save(step, stateful, {}, force=True)
        assert latest(manager.root) == f"step_{step:08d}\n"
    assert {p.name for p in manager.root.iterdir()} == {"step_00000005", "step_00000006", "step_00000010", "latest"}
    assert ckpt.newest_step(manager.root) == 10


def test_saving_a_committed_step_again_returns_it_untouched(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    path = manager.save(4, stateful, {}, force=True).wait()
    manifest_before = (path / "manifest.json").read_bytes()
    bump(stateful["model"])
    assert manager.save(4, stateful, {}, force=True).wait() == path
    assert (path / "manifest.json").read_bytes() == manifest_before


def test_sampler_state_restores_the_exact_next_batch_whatever_it_held_before(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    src = make_stateful(seed=1)
    manager.save(1, src, {}, force=True)
    dst = make_stateful(seed=2)  # its sampler (seed 2) has already drawn epoch 0's order
    manager.load(dst)
    assert dst["sampler"].state_dict() == src["sampler"].state_dict()
    assert dst["sampler"].next_batch()[0].tolist() == src["sampler"].next_batch()[0].tolist()


# -- the seams: declared state kinds, the files writer, FSDP2 weights -------------------------------


def test_an_entry_without_a_state_kind_is_a_type_error_naming_it(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    bare = dict(stateful, optimizer=stateful["optimizer"].obj)  # a bare torch optimizer declares nothing
    with pytest.raises(TypeError, match="stateful entry 'optimizer' \\(AdamW\\) declares state_kind=None"):
        manager.save(1, bare, {}, force=True)
    assert {p.name for p in manager.root.iterdir()} == set()

    manager.save(1, stateful, {}, force=True)
    fresh = make_stateful(seed=3)
    weights = clone_weights(fresh["model"])
    with pytest.raises(TypeError, match="'optimizer'"):
        manager.load(dict(fresh, optimizer=fresh["optimizer"].obj))
    assert_weights_equal(fresh["model"], weights)  # checked before anything is restored


def test_optimizer_pt_holds_the_tensor_state_by_key_and_none_entries_are_skipped(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    stateful["scaler"] = TensorState(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    with_scaler = manager.save(1, stateful, {}, force=True).wait()
    saved = torch.load(with_scaler / "optimizer.pt", weights_only=True)
    assert set(saved) == {"optimizer", "scaler"} and saved["scaler"]["scale"] == 2.0**10
    assert set(saved["optimizer"]["state"]) == set(range(16))
    stateful["scaler"] = None  # fp32: the trainer passes no scaler
    without = manager.save(2, stateful, {}, force=True).wait()
    assert set(torch.load(without / "optimizer.pt", weights_only=True)) == {"optimizer"}
    assert "scaler" not in json.loads((without / "trainer_state.json").read_text())

    fresh = make_stateful(seed=3)
    fresh["scaler"] = TensorState(torch.amp.GradScaler("cpu"))
    manager.load(fresh, with_scaler)
    assert fresh["scaler"].state_dict()["scale"] == 2.0**10


class ExtraShardFiles(HFCheckpointFiles):
    """The HF layout plus a file in a subfolder, as a sharded writer adds; `report` says whether it is reported."""

    def __init__(self, report: bool):
        super().__init__()
        self.report = report

    def write(self, tmp_dir, step, stateful, extra_json):
        files = super().write(tmp_dir, step, stateful, extra_json)
        (tmp_dir / "shards").mkdir()
        (tmp_dir / "shards" / "__0_0.distcp").write_bytes(b"shard")
        if self.report:
            files["shards/__0_0.distcp"] = {"size": 5, "sha256": hashlib.sha256(b"shard").hexdigest()}
        return files


def test_the_manifest_covers_exactly_the_files_the_writer_reports(run_dir):
    manager = CheckpointManager(make_cfg(), run_dir, files=ExtraShardFiles(report=True))
    path = manager.save(1, make_stateful(), {}, force=True).wait()
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == CHECKPOINT_FILES - {"manifest.json"} | {"shards/__0_0.distcp"}
    assert verify_checkpoint(path) is None
    flip_byte(path / "shards" / "__0_0.distcp")
    assert verify_checkpoint(path) == "shards/__0_0.distcp fails its sha256 check"
    manager.close()

    unreported = CheckpointManager(make_cfg(), run_dir, files=ExtraShardFiles(report=False))
    with pytest.raises(ValueError, match=r"and wrote \['shards/__0_0.distcp'\] it did not report"):
        unreported.save(2, make_stateful(), {}, force=True)
    assert steps(unreported.root) == {"step_00000001"} and leftovers(unreported.root) == []
    unreported.close()


def test_identity_and_stateful_keys_never_overwrite_metadata(run_dir, managers):
    with pytest.raises(ValueError, match=r"identity keys \['run'\] are not among"):
        CheckpointManager(make_cfg(), run_dir, identity={"config_sha256": "abc", "run": "x"})
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    stateful["metrics"] = TrainerCounters()
    with pytest.raises(ValueError, match=r"stateful entries \['metrics'\] would overwrite checkpoint metadata"):
        manager.save(1, stateful, {}, force=True)
    assert steps(manager.root) == set() and leftovers(manager.root) == []


def test_rotation_runs_only_once_latest_is_durable(run_dir, managers, monkeypatch, caplog):
    manager = managers(make_cfg(keep_last=1), run_dir)
    stateful = make_stateful()
    manager.save(1, stateful, {}, force=True)

    def refuse(name):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager, "_write_latest", refuse)
    with caplog.at_level(logging.WARNING, logger="gpt2exp.checkpoint"):
        assert manager.save(2, stateful, {}, force=True).wait() == manager.root / "step_00000002"
    assert "step_00000002 is saved but latest was not updated" in caplog.text
    assert steps(manager.root) == {"step_00000001", "step_00000002"}  # step 1, still named by latest, stays
    assert latest(manager.root) == "step_00000001\n"
    monkeypatch.undo()
    manager.save(3, stateful, {}, force=True)
    assert steps(manager.root) == {"step_00000003"} and latest(manager.root) == "step_00000003\n"


def test_a_failed_fsync_of_the_checkpoints_dir_after_the_rename_keeps_latest_and_rotates_nothing(
    run_dir, managers, monkeypatch, caplog
):
    """The new checkpoint is in place but its rename may not be durable: the older one stays named by
    `latest`, and every rank returns from the save alike (no rank is left waiting for rank 0)."""
    manager = managers(make_cfg(keep_last=1), run_dir)
    stateful = make_stateful()
    manager.save(1, stateful, {}, force=True)
    real_fsync_dir = ckpt._fsync_dir

    def fail_on_root(path):
        if Path(path) == manager.root:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(ckpt, "_fsync_dir", fail_on_root)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpt2exp.checkpoint"):
        assert manager.save(2, stateful, {}, force=True).wait() == manager.root / "step_00000002"
    assert caplog.messages == [
        "checkpoint step_00000002 is saved but latest was not updated: [Errno 5] Input/output error"
    ]
    assert steps(manager.root) == {"step_00000001", "step_00000002"} and latest(manager.root) == "step_00000001\n"


@pytest.mark.parametrize("async_save", [False, True])
def test_a_delete_that_fails_in_rotation_leaves_no_half_checkpoint_and_the_run_goes_on(
    run_dir, managers, monkeypatch, caplog, async_save
):
    """An old checkpoint whose delete fails partway (EBUSY; files held open on NFS): the new one is
    committed, the old one is out of the step_* names, and the next start removes what is left."""
    manager = managers(make_cfg(keep_last=1, async_save=async_save), run_dir)
    stateful = make_stateful()
    manager.save(1, stateful, {}, force=True).wait()

    real_rmtree = shutil.rmtree

    def fail_partway(path, *args, **kwargs):
        if not Path(path).name.startswith(".tmp-rotated-"):
            return real_rmtree(path, *args, **kwargs)
        (Path(path) / "model.safetensors").unlink()  # some files went before the failure
        raise OSError(errno.EBUSY, "Device or resource busy", str(path))

    monkeypatch.setattr(ckpt.shutil, "rmtree", fail_partway)
    with caplog.at_level(logging.WARNING, logger="gpt2exp.checkpoint"):
        assert manager.save(2, stateful, {}, force=True).wait() == manager.root / "step_00000002"
        manager.poll()
        manager.flush()  # nothing raised: the failure is not the save's
    monkeypatch.undo()
    left = f".tmp-rotated-step_00000001-{manager._tmp_suffix}"
    assert caplog.messages == [
        f"could not delete {left} ([Errno 16] Device or resource busy: '{manager.root / left}'); "
        "the next start removes it"
    ]
    assert steps(manager.root) == {"step_00000002"} and latest(manager.root) == "step_00000002\n"
    assert leftovers(manager.root) == [left]
    manager.close()
    restarted = managers(make_cfg(keep_last=1), run_dir)
    assert leftovers(restarted.root) == [] and verify_checkpoint(restarted.find_good()) is None


def test_a_checkpoint_rotation_cannot_move_stays_and_the_run_goes_on(run_dir, managers, monkeypatch, caplog):
    manager = managers(make_cfg(keep_last=1, async_save=True), run_dir)
    stateful = make_stateful()
    manager.save(1, stateful, {}, force=True).wait()

    real_replace = os.replace

    def refuse(source, destination):
        if not Path(destination).name.startswith(".tmp-rotated-"):  # the commit's own renames work
            return real_replace(source, destination)
        raise OSError(errno.EACCES, "Permission denied", str(source))

    monkeypatch.setattr(ckpt.os, "replace", refuse)
    with caplog.at_level(logging.WARNING, logger="gpt2exp.checkpoint"):
        manager.save(2, stateful, {}, force=True).wait()
        manager.flush()
    assert caplog.messages == [
        "could not rotate away checkpoint step_00000001 (permission denied (Permission denied)); it stays"
    ]
    assert steps(manager.root) == {"step_00000001", "step_00000002"} and latest(manager.root) == "step_00000002\n"
    monkeypatch.undo()
    manager.save(3, stateful, {}, force=True).wait()  # the next rotation takes both
    assert steps(manager.root) == {"step_00000003"} and leftovers(manager.root) == []


def test_close_logs_whatever_the_save_in_flight_raised_and_never_masks_the_exception_on_the_way_out(
    run_dir, managers, monkeypatch, caplog
):
    manager = managers(make_cfg(async_save=True), run_dir)

    def broken_write(*args, **kwargs):
        raise TypeError("a bug in a writer")

    monkeypatch.setattr(manager.files, "write", broken_write)
    manager.save(1, make_stateful(), {}, force=True)
    with caplog.at_level(logging.ERROR, logger="gpt2exp.checkpoint"):
        manager.close()  # in a `finally` after another exception: it must not replace that one
    assert caplog.messages == ["the checkpoint save in flight failed: TypeError('a bug in a writer')"]


FSDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel
    from gpt2exp.checkpoint_files import model_tensors

    out, rank, tiny = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**tiny))
    fully_shard(model)
    assert type(model.state_dict()["transformer.wte.weight"]).__name__ == "DTensor"
    torch.save(model_tensors(model), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    """
)


def test_model_tensors_gathers_fsdp2_shards_whole(tmp_path):
    import torch.distributed.fsdp

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch>=2.6")
    script = tmp_path / "fsdp_model_tensors.py"
    script.write_text(FSDP_SCRIPT)
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(rank), json.dumps(TINY)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        for rank in (0, 1)
    ]
    for proc in ranks:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr

    expected = ckpt.model_tensors(make_model(0))
    assert "lm_head.weight" not in expected  # tied to transformer.wte.weight
    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert list(gathered) == list(expected)
        for name, tensor in expected.items():
            assert type(gathered[name]) is torch.Tensor and torch.equal(gathered[name], tensor), (rank, name)


# -- when to save, what stays ----------------------------------------------------------------------


def test_keep_last_two_of_five(run_dir, managers):
    manager = managers(make_cfg(keep_last=2, keep_best=0), run_dir)
    stateful = make_stateful()
    for step in range(1, 6):
        manager.save(step, stateful, {}, force=True)
    assert steps(manager.root) == {"step_00000004", "step_00000005"}
    assert latest(manager.root) == "step_00000005\n"


def test_keep_best_keeps_an_old_best_step(run_dir, managers):
    manager = managers(make_cfg(keep_last=2, keep_best=1), run_dir)
    stateful = make_stateful()
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 1.5}
    for step, loss in losses.items():
        manager.save(step, stateful, {"val/loss": loss}, force=True)
    assert steps(manager.root) == {"step_00000002", "step_00000004", "step_00000005"}
    assert manager.kept() == {"step_00000002": ["best"], "step_00000004": ["last"], "step_00000005": ["last"]}


def test_keep_best_with_max_mode_and_ties_prefer_the_newer(run_dir, managers):
    cfg = make_cfg(keep_last=1, keep_best=1, best_metric="val/acc", best_mode="max")
    manager = managers(cfg, run_dir)
    stateful = make_stateful()
    for step, acc in {1: 0.5, 2: 0.9, 3: 0.9, 4: 0.1, 5: 0.2}.items():
        manager.save(step, stateful, {"val/acc": acc}, force=True)
    assert steps(manager.root) == {"step_00000003", "step_00000005"}


def test_keep_best_never_prefers_a_nan_metric(run_dir, managers):
    manager = managers(make_cfg(keep_last=1, keep_best=1), run_dir)
    stateful = make_stateful()
    for step, loss in {1: float("nan"), 2: 1.0, 3: 3.0}.items():
        manager.save(step, stateful, {"val/loss": loss}, force=True)
    assert steps(manager.root) == {"step_00000002", "step_00000003"}


def test_keep_every_milestones_stay(run_dir, managers):
    manager = managers(make_cfg(keep_last=1, keep_best=0, keep_every=2), run_dir)
    stateful = make_stateful()
    for step in range(1, 8):
        manager.save(step, stateful, {}, force=True)
    assert steps(manager.root) == {"step_00000002", "step_00000004", "step_00000006", "step_00000007"}


def test_keep_last_zero_still_keeps_the_newest(run_dir, managers):
    manager = managers(make_cfg(keep_last=0, keep_best=0), run_dir)
    stateful = make_stateful()
    for step in range(1, 4):
        manager.save(step, stateful, {}, force=True)
    assert steps(manager.root) == {"step_00000003"}


def test_every_steps_decides_which_steps_save(run_dir, managers):
    manager = managers(make_cfg(every_steps=3), run_dir)
    stateful = make_stateful()
    returned = {step: manager.save(step, stateful, {}) for step in range(1, 11)}
    assert {s for s, handle in returned.items() if handle is not None} == {3, 6, 9}
    assert all(returned[s] is None for s in (1, 2, 4, 5, 7, 8, 10))
    assert returned[9].done and returned[9].wait() == manager.root / "step_00000009"
    assert steps(manager.root) == {"step_00000003", "step_00000006", "step_00000009"}
    assert manager.save(10, stateful, {}, force=True).wait() == manager.root / "step_00000010"


def test_nothing_due_without_every_steps_or_minutes(run_dir, managers):
    manager = managers(make_cfg(every_steps=0, every_minutes=0.0), run_dir)
    stateful = make_stateful()
    assert [manager.save(step, stateful, {}) for step in range(1, 6)] == [None] * 5
    assert steps(manager.root) == set()


def test_every_minutes_saves_once_the_interval_passed(run_dir, managers, monkeypatch):
    clock = {"now": 1000.0}
    fake_time = types.SimpleNamespace(monotonic=lambda: clock["now"], time=time.time, strftime=time.strftime)
    monkeypatch.setattr(ckpt, "time", fake_time)
    manager = managers(make_cfg(every_minutes=2.0), run_dir)
    stateful = make_stateful()
    clock["now"] += 119
    assert manager.save(1, stateful, {}) is None
    clock["now"] += 1
    assert manager.save(2, stateful, {}).wait() == manager.root / "step_00000002"
    clock["now"] += 60  # the interval restarts at the save
    assert manager.save(3, stateful, {}) is None
    clock["now"] += 60
    assert manager.save(4, stateful, {}).wait() == manager.root / "step_00000004"


# -- a kill during a save --------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import gpt2exp.checkpoint as ckpt
    from tests.test_checkpoint import make_cfg, make_stateful

    stateful = make_stateful(seed=0)
    model = stateful["model"]
    manager = ckpt.CheckpointManager(make_cfg(async_save=False), sys.argv[1])
    manager.save(1, stateful, {"val/loss": 2.0}, force=True)
    print("saved step 1", flush=True)

    real_write_file = ckpt.write_file
    def write_file_then_die(path, data, hasher):
        if path.name == ckpt.OPTIMIZER_FILE:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write_file(path, data, hasher)
    ckpt.write_file = write_file_then_die

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    stateful["trainer"].step = 2
    manager.save(2, stateful, {"val/loss": 1.0}, force=True)
    print("step 2 survived the kill", flush=True)
    """
)


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(run_dir, managers):
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "saved step 1\n"

    root = run_dir / "checkpoints"
    (tmp_name,) = leftovers(root)
    assert tmp_name.startswith(".tmp-step_00000002-")
    partial = root / tmp_name
    # killed while writing optimizer.pt: the weights were written, the manifest never was
    assert {p.name for p in partial.iterdir()} == {"model.safetensors", "config.json"}
    assert steps(root) == {"step_00000001"}
    assert not (root / "step_00000002").exists()
    assert latest(root) == "step_00000001\n"
    assert verify_checkpoint(root / "step_00000001") is None
    partial_weights = load_file(partial / "model.safetensors")

    manager = managers(make_cfg(), run_dir)  # a restart
    assert leftovers(root) == []
    assert {p.name for p in root.iterdir()} == {"step_00000001", "latest"}
    stateful = make_stateful(seed=5)
    loaded = manager.load(stateful)
    assert loaded.path == root / "step_00000001" and loaded.step == 1
    assert stateful["trainer"].step == 1
    # the loaded weights are step 1's: the interrupted step 2 had every weight raised by 1
    weights = stateful["model"].state_dict()
    for name, tensor in partial_weights.items():
        assert torch.allclose(weights[name] + 1.0, tensor), name
    assert len(stateful["optimizer"].state_dict()["state"]) == 16
    # and training goes on: step 2 saves normally now
    assert manager.save(2, stateful, {}, force=True).wait() == root / "step_00000002"
    assert verify_checkpoint(root / "step_00000002") is None


# -- verification and fall-back --------------------------------------------------------------------


def corrupt_dirs(root: Path) -> list[str]:
    corrupt = root / "corrupt"
    return sorted(p.name for p in corrupt.iterdir()) if corrupt.is_dir() else []


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "model.safetensors has {short} bytes, the manifest says {size}"),
        ("flip", "model.safetensors fails its sha256 check"),
        ("delete", "optimizer.pt is missing"),
        ("manifest", "unreadable manifest"),
    ],
    ids=["truncated", "flipped-byte", "missing-file", "bad-manifest"],
)
def test_corrupt_newest_falls_back_to_the_previous(two_steps, damage, reason):
    manager, _, weights = two_steps
    root = manager.root
    newest = root / "step_00000002"
    size = (newest / "model.safetensors").stat().st_size
    if damage == "truncate":
        truncate(newest / "model.safetensors", by=100)
    elif damage == "flip":
        flip_byte(newest / "model.safetensors")
        assert (newest / "model.safetensors").stat().st_size == size
    elif damage == "delete":
        (newest / "optimizer.pt").unlink()
    else:
        (newest / "manifest.json").write_text('{"version": 1, "files": ')
    assert verify_checkpoint(newest).startswith(reason.format(short=size - 100, size=size))
    assert latest(root) == "step_00000002\n"

    stateful = make_stateful(seed=3)
    loaded = manager.load(stateful)

    assert loaded.path == root / "step_00000001" and loaded.step == 1
    assert_weights_equal(stateful["model"], weights[1])
    assert stateful["trainer"].step == 1
    assert steps(root) == {"step_00000001"}
    assert latest(root) == "step_00000001\n"
    (moved,) = corrupt_dirs(root)
    assert moved.startswith(f"step_00000002-{time.strftime('%Y%m%d')}") and moved.endswith(f"-{os.getpid()}")
    kept = root / "corrupt" / moved
    assert (kept / "config.json").is_file()  # kept for inspection, not deleted
    if damage == "truncate":
        assert (kept / "model.safetensors").stat().st_size == size - 100
    # a corrupt checkpoint is never a candidate again
    assert ckpt.list_checkpoints(root) == [root / "step_00000001"]


def test_a_later_save_of_the_quarantined_step_works(two_steps):
    manager, stateful, _ = two_steps
    root = manager.root
    truncate(root / "step_00000002" / "model.safetensors")
    assert manager.load(make_stateful(seed=3)).step == 1

    stateful["trainer"].step = 2
    again = clone_weights(stateful["model"])
    assert manager.save(2, stateful, {"val/loss": 0.5}, force=True).wait() == root / "step_00000002"
    assert verify_checkpoint(root / "step_00000002") is None
    assert latest(root) == "step_00000002\n"
    assert len(corrupt_dirs(root)) == 1
    assert leftovers(root) == []
    fresh = make_stateful(seed=4)
    assert manager.load(fresh).path == root / "step_00000002"
    assert_weights_equal(fresh["model"], again)


def test_quarantining_the_same_step_twice_keeps_both(two_steps, monkeypatch):
    # a fixed clock stands for "within the same second", which a fast restart loop reaches for real
    fake_time = types.SimpleNamespace(
        monotonic=time.monotonic, time=time.time, strftime=lambda fmt, *a: "20250101-000000"
    )
    monkeypatch.setattr(ckpt, "time", fake_time)
    manager, stateful, _ = two_steps
    root = manager.root
    truncate(root / "step_00000002" / "model.safetensors")
    assert manager.load(make_stateful(seed=3)).step == 1
    manager.save(2, stateful, {}, force=True)
    flip_byte(root / "step_00000002" / "model.safetensors")

    assert manager.load(make_stateful(seed=3)).step == 1
    assert len(corrupt_dirs(root)) == 2


def test_verify_size_does_not_detect_a_flipped_byte(run_dir, two_steps, managers):
    """The documented trade-off of checkpoint.verify=size: fast, but blind to same-size damage."""
    _, _, weights = two_steps
    root = run_dir / "checkpoints"
    flip_byte(root / "step_00000002" / "model.safetensors")
    assert verify_checkpoint(root / "step_00000002", "size") is None
    assert verify_checkpoint(root / "step_00000002", "sha256") == "model.safetensors fails its sha256 check"

    manager = managers(make_cfg(verify="size"), run_dir)
    stateful = make_stateful(seed=3)
    loaded = manager.load(stateful)
    assert loaded.step == 2  # the damaged checkpoint is loaded
    assert corrupt_dirs(root) == []
    actual = stateful["model"].state_dict()
    differing = [name for name, tensor in weights[2].items() if not torch.equal(actual[name], tensor)]
    assert len(differing) >= 1  # ... and one weight silently differs from what was saved


def test_none_verifies_lists_every_tried_dir(two_steps):
    manager, _, _ = two_steps
    root = manager.root
    size = (root / "step_00000001" / "model.safetensors").stat().st_size
    truncate(root / "step_00000001" / "model.safetensors", by=8)
    flip_byte(root / "step_00000002" / "optimizer.pt", offset=100)

    with pytest.raises(CheckpointError) as info:
        manager.load(make_stateful(seed=3))
    assert str(info.value) == (
        "no checkpoint verifies; tried: step_00000002 (optimizer.pt fails its sha256 check); "
        f"step_00000001 (model.safetensors has {size - 8} bytes, the manifest says {size})"
    )
    assert steps(root) == set()
    assert [name.split("-")[0] for name in corrupt_dirs(root)] == ["step_00000001", "step_00000002"]
    assert not (root / "latest").exists()


def test_no_checkpoints_at_all(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    with pytest.raises(CheckpointError, match="no checkpoints in .*; start a new run instead"):
        manager.load(make_stateful())


# -- a full disk and an unwritable destination -----------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root only), always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill up needs root")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill_until(path: Path, leave: int) -> Path:
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free_bytes(path) - leave))
    return filler


def test_disk_full_raises_and_keeps_earlier_checkpoints(small_tmpfs, managers, caplog):
    run_dir = small_tmpfs / "run"
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    first = manager.save(1, stateful, {"val/loss": 2.0}, force=True).wait()
    size = ckpt.checkpoint_size(first)
    filler = fill_until(small_tmpfs, leave=size // 2)
    assert free_bytes(small_tmpfs) < size

    with pytest.raises(SaveFailed) as info:
        manager.save(2, stateful, {"val/loss": 1.0}, force=True)
    assert not isinstance(info.value, UserError) and info.value.exit_code == EXIT_SAVE_FAILED == 74
    message = str(info.value)
    assert "checkpoint step_00000002 was not saved: no space left on device (disk full)" in message
    assert "earlier checkpoints are intact" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    root = manager.root
    assert leftovers(root) == []
    assert {p.name for p in root.iterdir()} == {"step_00000001", "latest"}
    assert latest(root) == "step_00000001\n"
    assert verify_checkpoint(first) is None

    warn = managers(make_cfg(on_save_error="warn"), run_dir)
    with caplog.at_level(logging.WARNING, logger="gpt2exp.checkpoint"):
        assert warn.save(2, stateful, {"val/loss": 1.0}, force=True).wait() is None
    assert "no space left on device" in caplog.text and "training goes on" in caplog.text
    assert leftovers(root) == [] and steps(root) == {"step_00000001"}

    filler.unlink()  # space freed: the next save succeeds, nothing was lost on the way
    assert warn.save(3, stateful, {"val/loss": 0.5}, force=True).wait() == root / "step_00000003"
    assert verify_checkpoint(root / "step_00000003") is None
    assert verify_checkpoint(first) is None
    assert latest(root) == "step_00000003\n"
    assert warn.load(make_stateful(seed=3)).step == 3


def test_read_only_filesystem_raises_permission_denied(small_tmpfs, managers):
    run_dir = small_tmpfs / "run"
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    weights = clone_weights(stateful["model"])
    first = manager.save(1, stateful, {}, force=True).wait()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:
        with pytest.raises(SaveFailed, match=r"step_00000002 was not saved: permission denied \(Read-only"):
            manager.save(2, stateful, {}, force=True)
        assert {p.name for p in manager.root.iterdir()} == {"step_00000001", "latest"}
        assert verify_checkpoint(first) is None
        fresh = make_stateful(seed=3)
        assert manager.load(fresh).step == 1
        assert_weights_equal(fresh["model"], weights)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)


@pytest.mark.parametrize("on_save_error", ["stop", "warn"])
def test_permission_denied_while_writing(run_dir, managers, monkeypatch, on_save_error):
    """root ignores chmod 0o555, so the EACCES a read-only checkpoints dir gives comes from a patch."""
    manager = managers(make_cfg(on_save_error=on_save_error), run_dir)
    stateful = make_stateful()
    first = manager.save(1, stateful, {}, force=True).wait()
    real_write_file = ckpt.write_file
    written = []

    def refuse_optimizer(path, data, hasher):
        if path.name == "optimizer.pt":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        written.append(path.name)
        return real_write_file(path, data, hasher)

    monkeypatch.setattr(ckpt, "write_file", refuse_optimizer)
    if on_save_error == "stop":
        with pytest.raises(SaveFailed) as info:
            manager.save(2, stateful, {}, force=True)
        assert "checkpoint step_00000002 was not saved: permission denied (Permission denied)" in str(info.value)
        assert "fix permissions" in str(info.value)
    else:
        assert manager.save(2, stateful, {}, force=True).wait() is None
    assert written == ["model.safetensors", "config.json"]  # a partial dir existed and was removed
    assert {p.name for p in manager.root.iterdir()} == {"step_00000001", "latest"}
    assert verify_checkpoint(first) is None
    assert manager.load(make_stateful(seed=3)).step == 1


def test_chmod_read_only_checkpoints_dir(run_dir, managers):
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits; test_permission_denied_while_writing covers EACCES")
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    first = manager.save(1, stateful, {}, force=True).wait()
    manager.root.chmod(0o555)
    try:
        with pytest.raises(SaveFailed, match=r"permission denied"):
            manager.save(2, stateful, {}, force=True)
    finally:
        manager.root.chmod(0o755)
    assert steps(manager.root) == {"step_00000001"}
    assert verify_checkpoint(first) is None


# -- what a checkpoint may contain -----------------------------------------------------------------


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_payload(kind: str, path: Path, marker: Path) -> None:
    if kind == "torch.save os.system":
        torch.save({"optimizer": SystemPayload(marker)}, path)
    else:  # a bare pickle, not torch's zip format
        path.write_bytes(pickle.dumps({"optimizer": OpenPayload(marker)}, protocol=2))


@pytest.mark.parametrize("kind", ["torch.save os.system", "pickle open"])
def test_malicious_pickle_is_refused_and_never_runs(run_dir, managers, tmp_path, kind):
    # the payload really is malicious: a plain unpickle runs it
    control = tmp_path / "control"
    write_payload(kind, tmp_path / "control.pt", control)
    if kind == "pickle open":
        pickle.loads((tmp_path / "control.pt").read_bytes())["optimizer"].close()
    else:
        torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    manager = managers(make_cfg(), run_dir)
    path = manager.save(1, make_stateful(), {}, force=True).wait()
    marker = tmp_path / "pwned"
    write_payload(kind, path / "optimizer.pt", marker)
    rewrite_manifest_entry(path, "optimizer.pt")
    assert verify_checkpoint(path) is None

    with pytest.raises(
        CheckpointError, match="holds something other than tensors and plain values; refusing to unpickle"
    ):
        manager.load(make_stateful(seed=3))
    assert not marker.exists()
    assert steps(manager.root) == {"step_00000001"}  # it verified: not quarantined


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"n_embd": 32}, "size mismatch for transformer.wte.weight"),
        ({"n_layer": 2}, "missing ['transformer.h.1."),
    ],
    ids=["n_embd", "n_layer"],
)
def test_shape_mismatch_is_a_checkpoint_error(run_dir, managers, overrides, detail):
    manager = managers(make_cfg(), run_dir)
    path = manager.save(1, make_stateful(), {}, force=True).wait()
    other = make_stateful(**overrides)
    with pytest.raises(CheckpointError) as info:
        manager.load(other)
    message = str(info.value)
    assert f"checkpoint {path} does not match the model its config describes" in message
    assert detail in message
    assert steps(manager.root) == {"step_00000001"} and verify_checkpoint(path) is None


def scratch_model_cfg(model):
    """The `model` section of a config of record that describes `model` (a scratch GPT-2)."""
    c = model.config
    return OmegaConf.create(
        {"init": "scratch", "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.n_positions}
    )


def flip_first_byte(path: Path) -> None:
    flip_byte(path, 0)


def break_end_of_zip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.rindex(b"PK\x05\x06")] ^= 0xFF  # the end-of-archive record: torch.load cannot open it
    path.write_bytes(bytes(data))


def set_n_layer_9(path: Path) -> None:
    data = path.read_bytes()
    assert b'"n_layer": 1,' in data
    path.write_bytes(data.replace(b'"n_layer": 1,', b'"n_layer": 9,'))  # the same size, another shape


@pytest.mark.parametrize(
    ("file", "corrupt"),
    [("config.json", flip_first_byte), ("config.json", set_n_layer_9), ("optimizer.pt", break_end_of_zip)],
    ids=["config-not-utf8", "config-other-shape", "optimizer-zip-end"],
)
def test_a_launch_checks_the_checkpoint_before_the_newest_when_the_newest_is_corrupt_behind_intact_sizes(
    run_dir, managers, caplog, file, corrupt
):
    """What the job would do (its sha256 moves the newest aside and loads the one before), the launch's
    cheap check foresees: it neither refuses the run nor fails with a traceback."""
    manager = managers(make_cfg(), run_dir)
    stateful = make_stateful()
    manager.save(1, stateful, {}, force=True)
    newest = manager.save(2, stateful, {}, force=True).wait()
    size = (newest / file).stat().st_size
    corrupt(newest / file)
    assert (newest / file).stat().st_size == size and verify_checkpoint(newest, "size") is None
    model_cfg = scratch_model_cfg(stateful["model"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpt2exp.checkpoint"):
        assert check_loadable(manager.root, None, model_cfg) == manager.root / "step_00000001"
    assert caplog.messages == [f"checkpoint {newest} failed verification: {file} fails its sha256 check"]
    assert steps(manager.root) == {"step_00000001", "step_00000002"}  # the launch moves nothing
    with pytest.raises(CheckpointError) as refused:  # named, it is refused: never another one
        check_loadable(manager.root, newest, model_cfg)
    assert str(refused.value) == f"checkpoint {newest} failed verification: {file} fails its sha256 check"
    with pytest.raises(CheckpointError):  # checkpoint.verify=size: the job would load the newest, so it is refused
        check_loadable(manager.root, None, model_cfg, verify="size")
    loaded = manager.load(make_stateful(seed=3))  # the job: the newest moves aside, the one before loads
    assert loaded.step == 1 and steps(manager.root) == {"step_00000001"}


def test_every_rank_fails_a_save_alike_whatever_each_rank_hit():
    """What each rank raises from the reports of all ranks (one per rank, None where it went well)."""
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    io, bug = ckpt._failure_report(disk_full), ckpt._failure_report(ValueError("a bug"))
    with pytest.raises(OSError) as own:  # an I/O failure everywhere: this rank's own
        ckpt._raise_first(disk_full, [io, io])
    assert own.value is disk_full
    with pytest.raises(OSError) as other:  # a rank that went well fails with the other rank's
        ckpt._raise_first(None, [None, io])
    assert other.value.errno == errno.ENOSPC
    with pytest.raises(ckpt.RankFailed, match=r"^another rank failed: a bug$"):  # a bug elsewhere outranks I/O
        ckpt._raise_first(disk_full, [io, bug])
    with pytest.raises(ckpt.RankFailed, match=r"^another rank failed: a bug$"):
        ckpt._raise_first(None, [io, None, bug])
    with pytest.raises(ValueError, match=r"^a bug$"):  # where it happened, with its traceback
        ckpt._raise_first(ValueError("a bug"), [io, bug])
    ckpt._raise_first(None, [None, None])  # nothing failed


def test_a_data_position_in_other_data_is_refused_before_anything_is_restored(run_dir, managers):
    manager = managers(make_cfg(), run_dir)
    manager.save(1, make_stateful(), {}, force=True)
    other = make_stateful(seed=3)
    other["sampler"] = BatchSampler(np.arange(512, dtype=np.uint16), block_size=8, batch_size=2, seed=0)
    optimizer = other["optimizer"].obj

    def moments() -> list[torch.Tensor]:
        return [state[name].clone() for state in optimizer.state.values() for name in ("exp_avg", "exp_avg_sq")]

    weights, before = clone_weights(other["model"]), moments()
    with pytest.raises(UserError, match=r"^the checkpoint's data position is one in 255 training windows, and this"):
        manager.load(other)
    assert_weights_equal(other["model"], weights)  # refused before the weights were restored
    assert all(torch.equal(a, b) for a, b in zip(moments(), before, strict=True))
    assert len(before) == 2 * len(list(other["model"].parameters()))
    assert (other["sampler"].seed, other["sampler"].epoch, other["sampler"].offset) == (0, 0, 0)
