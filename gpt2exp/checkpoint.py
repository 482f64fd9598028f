"""CheckpointManager: the only code that reads or writes checkpoint files.

    checkpoints/step_00000200/
      model.safetensors config.json   GPT2LMHeadModel.from_pretrained(dir) works
      tokenizer.json ...              AutoTokenizer.from_pretrained(dir) works
      optimizer.pt                    optimizer + grad scaler; tensors only (torch.load weights_only=True)
      trainer_state.json              counters, sampler, schedule, RNG, W&B id, config hash, metrics
      manifest.json                   size + sha256 of every file above; written last
    checkpoints/latest                names the newest committed checkpoint
    checkpoints/corrupt/              checkpoints that failed verification, kept for inspection

`checkpoints/` is `<run dir>/checkpoints`, or `<checkpoint.dir>/<run id>/` on another disk: wherever
the run's run.json records (rundir.checkpoints_root); every guarantee below holds there alike.

A save writes into a hidden temporary sibling, fsyncs every file, writes the manifest, renames the
directory into place, fsyncs the parent, replaces `latest` atomically, and only then rotates old
checkpoints away. A directory without a valid manifest is not a checkpoint.

The seams: each stateful object declares where its state goes (`state_kind`, see state.py). A files
writer (`HFCheckpointFiles`, the layout above; a sharded one can take its place) writes the stateful
set into the temporary dir and reports the files it wrote, and reads them back; the formats the
writers share (a file hashed as it is written, safetensors, weights_only tensor state) are in
checkpoint_files.py. The manager owns the rest: the manifest of the reported files, the commit,
verification, quarantine, and rotation as its own step after a commit. `save` hands back a
`PendingSave`, complete on return while saves are synchronous, so a background save changes no caller.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2exp import distributed
from gpt2exp.checkpoint_files import (
    MODEL_FILE,
    MODEL_KEY,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointFiles,
    build_trainer_state,
    check_json_state,
    io_pool,
    load_tensor_state,
    model_tensors,
    restore_model,
    split_stateful,
    tensor_state_writer,
    write_file,
    write_pretrained_files,
)
from gpt2exp.checkpoint_sharded import OPTIMIZER_DIR, OTHER_TENSORS, is_sharded, read_checkpoint, read_dcp_metadata
from gpt2exp.distributed import World
from gpt2exp.errors import SaveFailed
from gpt2exp.rundir import checkpoints_root, timestamp
from gpt2exp.snapshot import Copy, HostSnapshot, freeze, state_tensors

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
CORRUPT = "corrupt"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
MANIFEST_VERSION = 1
# identity the trainer records in every trainer_state.json (CheckpointManager's `identity`)
IDENTITY_KEYS = ("config_sha256", "code_version")
# the keys of trainer_state.json that describe the checkpoint and restore no object
METADATA_KEYS = ("step", "metrics", "saved_at", *IDENTITY_KEYS)  # a sharded checkpoint adds world_size


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a step_XXXXXXXX checkpoint dir")
    return int(match.group(1))


def is_checkpoint_dir(path: Path) -> bool:
    return bool(STEP_DIR.match(path.name)) and (path / MANIFEST).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under `root` (those with a manifest), oldest first. Not yet verified."""
    return [p for p in step_dirs(root) if (p / MANIFEST).is_file()]


def step_dirs(root: Path) -> list[Path]:
    """Every step_* dir under `root`, oldest first: the committed ones, and any that lost its manifest
    (a commit makes none such: a file deleted, a partial copy)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


# -- writing and verifying files -----------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_files(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's `files`: each file's name, `size` and `sha256`; ValueError where it holds no such."""
    manifest = json.loads((path / MANIFEST).read_text())
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    ):
        raise ValueError("its files are not listed with a size and a sha256 each")
    return files


def verify_checkpoint(path: Path, mode: str = "sha256") -> str | None:
    """None if `path` matches its manifest, else the reason it does not."""
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST}"
    try:
        files = manifest_files(path)
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']}"
    if mode == "sha256":
        # hash the files side by side: hashlib releases the GIL, so big files use every core
        with ThreadPoolExecutor(max_workers=min(4, max(1, len(files)))) as pool:
            digests = dict(zip(files, pool.map(lambda n: _file_digest(path / n), files), strict=True))
        for name, entry in files.items():
            if digests[name] != entry["sha256"]:
                return f"{name} fails its sha256 check"
    return None


def _move_aside(root: Path, path: Path) -> None:
    """`path` out of the step_* namespace into corrupt/, kept for inspection."""
    corrupt = root / CORRUPT
    corrupt.mkdir(exist_ok=True)
    log.warning("moving %s to %s/ for inspection; it will not be loaded again", path.name, CORRUPT)
    stem = f"{path.name}-{timestamp(for_name=True)}-{os.getpid()}"
    destination, n = corrupt / stem, 1
    while destination.exists():  # the same step may go bad again within the second
        destination, n = corrupt / f"{stem}-{n}", n + 1
    os.replace(path, destination)
    _fsync_dir(root)


def _describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on device (disk full)"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({exc.strerror})"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def find_verified(
    root: Path,
    mode: str = "sha256",
    target: Path | None = None,
    on_corrupt: Callable[[Path], None] | None = None,
    corrupt: Mapping[Path, str] | None = None,
) -> Path:
    """`target` if given (it must verify: a named checkpoint never silently becomes another one),
    else the newest checkpoint under `root` that verifies, leaving out those already found `corrupt`
    (with the reason).

    Each one that fails is logged and handed to `on_corrupt`; if none verifies, the CheckpointError
    lists what was tried.
    """
    corrupt = corrupt or {}
    candidates = [target] if target is not None else [p for p in reversed(list_checkpoints(root)) if p not in corrupt]
    tried = [f"{path.name} ({reason})" for path, reason in corrupt.items()]
    for path in candidates:
        reason = verify_checkpoint(path, mode)
        if reason is None:
            return path
        tried.append(f"{path.name} ({reason})")
        log.warning("checkpoint %s failed verification: %s", path, reason)
        if on_corrupt is not None:
            on_corrupt(path)
    if not tried:
        raise CheckpointError(f"no checkpoints in {root}; start a new run instead")
    raise CheckpointError("no checkpoint verifies; tried: " + "; ".join(tried))


# -- the files of a checkpoint -------------------------------------------------------------------


class HFCheckpointFiles:
    """The layout in the module docstring, written by one process.

    model.safetensors is streamed tensor by tensor, optimizer.pt holds the "tensors" state by key
    ({"optimizer": ..., "scaler": ...}), trainer_state.json the "json" state by key plus metadata.
    """

    def __init__(self, tokenizer_dir: Path | None = None):
        self.tokenizer_dir = tokenizer_dir
        self._io = io_pool()

    def write(
        self, tmp_dir: Path, step: int, stateful: Mapping[str, Any], extra_json: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        model, groups = split_stateful(stateful)
        json_state = build_trainer_state(groups["json"], step, extra_json)
        files: dict[str, dict[str, Any]] = {}

        def write(name: str, data: bytes | Callable[[Any], None]) -> None:
            files[name] = write_file(tmp_dir / name, data, self._io)

        write_pretrained_files(write, model_tensors(model), model.config, self.tokenizer_dir)
        write(OPTIMIZER_FILE, tensor_state_writer({k: obj.state_dict() for k, obj in groups["tensors"].items()}))
        write(STATE_FILE, json.dumps(json_state).encode())
        return files

    def read(self, path: Path, stateful: Mapping[str, Any]) -> dict[str, Any]:
        """Read and check every file first, then restore: a refused file leaves every object untouched."""
        from safetensors.torch import load_file

        if is_sharded(path):  # written by several processes: resharded into this one
            return read_checkpoint(path, stateful, rank=0)
        model, groups = split_stateful(stateful)
        weights = load_file(path / MODEL_FILE)
        tensor_state = load_tensor_state(path / OPTIMIZER_FILE)
        state = json.loads((path / STATE_FILE).read_text())
        check_json_state(groups, state)
        restore_model(path, model, weights)
        for kind, saved in (("tensors", tensor_state), ("json", state)):
            for key, obj in groups[kind].items():
                if key in saved:
                    obj.load_state_dict(saved[key])
        return state

    def close(self) -> None:
        self._io.shutdown(wait=True)


def _check_reported(tmp_dir: Path, files: Mapping[str, Any]) -> None:
    """The manifest must cover exactly what is on disk: a file the writer did not report is a bug."""
    on_disk = {p.relative_to(tmp_dir).as_posix() for p in tmp_dir.rglob("*") if p.is_file()}
    if on_disk != set(files):
        raise ValueError(
            f"the checkpoint writer reported {sorted(set(files) - on_disk)} that are not in {tmp_dir} "
            f"and wrote {sorted(on_disk - set(files))} it did not report"
        )


# -- retention ----------------------------------------------------------------------------------


def manifest_metric(path: Path, metric: str) -> float | None:
    try:
        value = json.loads((path / MANIFEST).read_text())["metrics"].get(metric)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return float(value) if value is not None else None


# the checkpoint.* settings that decide what stays (a resume may change them: run.json records each one's)
RETENTION_KEYS = ("keep_last", "keep_best", "keep_every", "best_metric", "best_mode")


def kept_reasons(root: Path, cfg: Any) -> dict[str, list[str]]:
    """Why each committed checkpoint under `root` stays (last/best/milestone); [] means rotate it away.

    The newest is always kept, and every one with keep_last=-1; a NaN metric never ranks as best.
    """
    checkpoints = list_checkpoints(root)
    reasons: dict[str, list[str]] = {p.name: [] for p in checkpoints}
    if not checkpoints:
        return reasons
    for path in checkpoints if cfg.keep_last == -1 else checkpoints[-max(1, cfg.keep_last) :]:
        reasons[path.name].append("last")
    if cfg.keep_every:
        for path in checkpoints:
            if step_of(path) % cfg.keep_every == 0:
                reasons[path.name].append("milestone")
    if cfg.keep_best:
        scored = [(m, p) for p in checkpoints if (m := manifest_metric(p, cfg.best_metric)) is not None]
        scored = [(m, p) for m, p in scored if not math.isnan(m)]
        sign = 1.0 if cfg.best_mode == "min" else -1.0
        scored.sort(key=lambda item: (sign * item[0], -step_of(item[1])))
        for _, path in scored[: cfg.keep_best]:
            reasons[path.name].append("best")
    return reasons


# -- the manager ---------------------------------------------------------------------------------


class PendingSave:
    """A save that was due: `wait()` gives the committed dir, or None if it failed under on_save_error=warn.

    Saves are synchronous today, so it is done when handed back; a background save hands back one
    still running.
    """

    def __init__(self, future: Future[Path | None]):
        self._future = future

    @classmethod
    def finished(cls, path: Path | None) -> PendingSave:
        future: Future[Path | None] = Future()
        future.set_result(path)
        return cls(future)

    @property
    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> Path | None:
        return self._future.result()


@dataclass
class Loaded:
    path: Path
    step: int
    trainer_state: dict[str, Any]


class CheckpointManager:
    """save / load / close; `_should_save` decides when, `_rotate` decides what stays."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        tokenizer_dir: Path | None = None,
        identity: dict[str, Any] | None = None,
        files: CheckpointFiles | None = None,
        world: World | None = None,
    ):
        """`identity` (IDENTITY_KEYS) is recorded in every trainer_state.json; `files` writes and reads
        the files of a checkpoint (default: HFCheckpointFiles(tokenizer_dir)).

        In a `world` of several processes every rank calls every method alike: each writes its own
        files, rank 0 alone commits, rotates and moves corrupt checkpoints aside, and every decision
        (whether a save is due, which checkpoint loads, whether a save failed) is rank 0's or agreed.
        """
        unknown = set(identity or {}) - set(IDENTITY_KEYS)
        if unknown:
            raise ValueError(f"identity keys {sorted(unknown)} are not among {IDENTITY_KEYS}")
        if files is not None and tokenizer_dir is not None:
            raise ValueError("tokenizer_dir belongs to the files writer when one is given")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._root: Path | None = None  # found on first use (`root`)
        self.identity = dict(identity or {})
        self.files = files if files is not None else HFCheckpointFiles(tokenizer_dir)
        self.world = world or World()
        self._last_save_time = time.monotonic()
        if self.world.main:  # a resumed run's, before anything is loaded
            root = checkpoints_root(self.run_dir)
            self._clean_leftovers(root)
            self._set_aside_unmanifested(root)
        self._tmp_suffix = str(distributed.broadcast(os.getpid()))  # one temporary dir for all ranks
        # background saves: a frozen copy of the state is written by one thread, one save at a time. A files
        # writer that captures its own share (several ranks: ShardedCheckpointFiles) brings the process
        # group its commit runs its collectives on, beside training's
        self._captures = hasattr(self.files, "capture")
        self._group = getattr(self.files, "group", None)
        background = bool(cfg.async_save)
        self._snapshot = HostSnapshot() if background and not self._captures else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckpt-save") if background else None
        self._in_flight: PendingSave | None = None

    @property
    def root(self) -> Path:
        """The run's checkpoints dir, where its run.json records it (rundir.checkpoints_root:
        `<run dir>/checkpoints` or `<checkpoint.dir>/<run id>`). Found on first use, once a fresh run
        has written its run.json; made if missing."""
        if self._root is None:
            root = checkpoints_root(self.run_dir)
            root.mkdir(parents=True, exist_ok=True)
            self._root = root
        return self._root

    # -- public API

    def save(
        self, step: int, stateful: Mapping[str, Any], metrics: dict[str, float], *, force: bool = False
    ) -> PendingSave | None:
        """Commit a checkpoint of `stateful` at `step` if due (or `force`); None if no save was due.

        With checkpoint.async_save the state is frozen now and written in the background: the handle
        is still running when it comes back; a save that comes due while another runs first waits for
        it (one in flight at most). On an I/O failure the partial directory is removed, earlier
        checkpoints are untouched, and SaveFailed is raised (on_save_error=stop: by `save` itself, or
        for a background save by the next `poll`, `flush` or `save`) or a warning logged
        (on_save_error=warn: the handle's wait() gives None).
        """
        if not distributed.broadcast(force or self._should_save(step)):  # rank 0's clock decides for all
            return None
        final = self.root / step_dir_name(step)
        self.flush()  # one save in flight at most (its buffers are reused by this one), and it may be this step's
        if distributed.broadcast(is_checkpoint_dir(final)):
            return PendingSave.finished(final)  # already committed (e.g. a signal right after a periodic save)
        self._last_save_time = time.monotonic()
        if self._writer is None:
            return PendingSave.finished(self._commit_and_rotate(step, stateful, metrics, final, None))
        if self._captures:  # this rank's share, copied now; the writing goes on in the background
            captured = self.files.capture(stateful, copy=True)
            future = self._writer.submit(self._commit_and_rotate, step, captured, metrics, final, None)
            self._in_flight = PendingSave(future)
            return self._in_flight
        model, groups = split_stateful(stateful)
        weights = model_tensors(model, on_cpu=False)
        frozen, copy = freeze(MODEL_KEY, weights, model.config.to_json_string(), groups, self._snapshot)
        self._in_flight = PendingSave(self._writer.submit(self._commit_and_rotate, step, frozen, metrics, final, copy))
        return self._in_flight

    def has(self, step: int) -> bool:
        """Whether the checkpoint of `step` is committed (as rank 0 sees it, on every rank)."""
        return distributed.broadcast(is_checkpoint_dir(self.root / step_dir_name(step)))

    def reserve_snapshot(self, stateful: Mapping[str, Any]) -> Future[None] | None:
        """Make a background save's host buffers now, for the state as it is: call it once the optimizer
        has its state (after its first step), so that the run's first save does not wait for them.
        On CUDA their page-locking goes on in the background: returns it."""
        if self._snapshot is None or self._in_flight is not None:  # a save in flight made them already
            return None
        model, groups = split_stateful(stateful)
        return self._snapshot.reserve(state_tensors(MODEL_KEY, model_tensors(model, on_cpu=False), groups)[0])

    def wait_snapshot(self) -> None:
        """Call before the state changes (the optimizer update): waits until a background save has its copy."""
        if self._snapshot is not None:
            self._snapshot.wait_copied()

    def poll(self) -> None:
        """At a step boundary: a background save that failed raises its SaveFailed now. Several ranks
        take its end in at the same step: once it is done on every rank."""
        if self._in_flight is not None and not distributed.any_rank(not self._in_flight.done):
            self.flush()

    def flush(self) -> Path | None:
        """Wait for the save in flight, if any, to commit; raises its SaveFailed. Returns its dir."""
        pending, self._in_flight = self._in_flight, None
        return pending.wait() if pending is not None else None

    def _commit_and_rotate(
        self, step: int, stateful: Mapping[str, Any], metrics: dict[str, float], final: Path, copy: Copy | None
    ) -> Path | None:
        start = time.monotonic()
        try:
            if copy is not None:
                copy.on_host()
            latest_updated = self._commit(step, stateful, metrics, final)
        except (OSError, RuntimeError) as exc:
            message = (
                f"checkpoint {final.name} was not saved: {_describe_os_error(exc)} in {self.root}; "
                "earlier checkpoints are intact"
            )
            if self.cfg.on_save_error == "warn":
                log.warning("%s (training goes on: checkpoint.on_save_error=warn)", message)
                return None
            raise SaveFailed(message + "; free space or fix permissions, then resume") from exc
        how = "in the background " if self._writer is not None else ""
        log.info("saved checkpoint %s %sin %.2fs", final.name, how, time.monotonic() - start)
        if latest_updated:
            self._rotate()
        return final

    def load(self, stateful: Mapping[str, Any], target: Path | None = None) -> Loaded:
        """Load `target` (or the newest checkpoint that verifies) into `stateful`."""
        path = distributed.rank0_decides(lambda: self.find_good(target))  # every rank falls back alike
        state = self.files.read(path, stateful)
        log.info("loaded checkpoint %s", path)
        return Loaded(path, int(state["step"]), state)

    def close(self) -> None:
        """Wait for a save in flight (its failure is logged: close runs on the way out), then release."""
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the exception on the way out goes on
            log.error("%s", exc if isinstance(exc, SaveFailed) else f"the checkpoint save in flight failed: {exc!r}")
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            try:
                if self._snapshot is not None:
                    self._snapshot.close()
            finally:
                self.files.close()

    # -- finding a good checkpoint

    def find_good(self, target: Path | None = None) -> Path:
        """`target` if given and it verifies; else the newest checkpoint that verifies. Corrupt ones move aside."""
        return find_verified(self.root, self.cfg.verify, target, on_corrupt=self._quarantine)

    def _quarantine(self, path: Path) -> None:
        """Move a corrupt checkpoint out of the step_* namespace: kept for inspection, never loaded (rank 0)."""
        _move_aside(self.root, path)
        self._point_latest_at_newest()

    def _set_aside_unmanifested(self, root: Path) -> None:
        """A step dir without its manifest is no checkpoint, but its name would block saving that step
        again (the commit's rename onto it fails): moved aside like a corrupt one (rank 0)."""
        unmanifested = [p for p in step_dirs(root) if not (p / MANIFEST).is_file()]
        for path in unmanifested:
            log.warning("%s has no %s: it is no committed checkpoint", path.name, MANIFEST)
            _move_aside(root, path)
        if unmanifested:
            self._point_latest_at_newest()

    # -- saving

    def _should_save(self, step: int) -> bool:
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        minutes = (time.monotonic() - self._last_save_time) / 60.0
        return bool(self.cfg.every_minutes) and minutes >= self.cfg.every_minutes

    def _commit(self, step: int, stateful: Mapping[str, Any], metrics: dict[str, float], final: Path) -> bool:
        """Write, add the manifest, rename into place, point `latest` at it; whether `latest` was updated.

        Several ranks write into one temporary dir; rank 0 writes the manifest of every rank's files once
        all reported, then commits. A rank's failure fails the save on every rank, and the dir goes. Every
        rank takes part in the same collectives wherever one fails: a failure of rank 0's own steps (the
        dir, the manifest, the rename) reaches the others through them, none is left waiting for it.
        """
        tmp = self.root / f"{TMP_PREFIX}{final.name}-{self._tmp_suffix}"
        main = self.world.main
        failure: BaseException | None = None
        try:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                failure = _attempt(tmp.mkdir)
            _raise_first(failure, [distributed.broadcast(_failure_report(failure), group=self._group)])
            extra_json = {**self.identity, "metrics": metrics, "saved_at": time.time()}
            files: dict[str, dict[str, Any]] = {}
            try:
                files = self.files.write(tmp, step, stateful, extra_json)
            except Exception as exc:  # noqa: BLE001 - every rank hears of it, then it is raised
                failure = exc
            reports = distributed.gather_to_all((files, _failure_report(failure)), self._group)
            _raise_first(failure, [report for _, report in reports])
            if main:
                every_file = {name: entry for rank_files, _ in reports for name, entry in rank_files.items()}
                failure = _attempt(lambda: self._place(tmp, final, step, metrics, every_file))
            latest_updated = False
            if main and failure is None:
                try:
                    latest_updated = self._point_latest_at(final)
                except Exception as exc:  # noqa: BLE001 - a bug: every rank hears of it
                    failure = exc
            failed, latest_updated = distributed.broadcast(
                (_failure_report(failure), latest_updated), group=self._group
            )
            _raise_first(failure, [failed])
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return latest_updated  # every rank returns once rank 0 committed

    @staticmethod
    def _place(tmp: Path, final: Path, step: int, metrics: dict[str, float], files: dict[str, Any]) -> None:
        """Rank 0: the manifest of every rank's files, then the rename that commits the checkpoint."""
        _check_reported(tmp, files)
        manifest = {"version": MANIFEST_VERSION, "step": step, "metrics": metrics, "files": files}
        with open(tmp / MANIFEST, "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)

    def _point_latest_at(self, final: Path) -> bool:
        """Rank 0, once `final` is in place: whether `latest` names it now."""
        try:
            _fsync_dir(self.root)  # the rename, durable
            self._write_latest(final.name)
            return True
        except OSError as exc:  # the checkpoint is in place; without `latest` no older one is rotated away
            log.warning("checkpoint %s is saved but %s was not updated: %s", final.name, LATEST, exc)
            return False

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f"{TMP_PREFIX}{LATEST}-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        _fsync_dir(self.root)

    def _point_latest_at_newest(self) -> None:
        remaining = list_checkpoints(self.root)
        if remaining:
            self._write_latest(remaining[-1].name)
        else:
            (self.root / LATEST).unlink(missing_ok=True)

    @staticmethod
    def _clean_leftovers(root: Path) -> None:
        if not root.is_dir():
            return
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                log.info("removing %s, left by an interrupted save", path.name)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    # -- rotation: its own step, run once a commit and its `latest` are durable

    def kept(self) -> dict[str, list[str]]:
        return kept_reasons(self.root, self.cfg)

    def _rotate(self) -> None:
        """Delete the checkpoints no rule keeps. Each leaves the step_* names by a rename first, so a
        delete cut short leaves a leftover for the next start, never a half checkpoint. A failure is
        logged: the new checkpoint is committed, and an old one left on disk loses nothing."""
        if not self.world.main:
            return
        for name, reasons in self.kept().items():
            if not reasons:
                log.info("rotating away checkpoint %s", name)
                doomed = self.root / f"{TMP_PREFIX}rotated-{name}-{self._tmp_suffix}"
                try:
                    os.replace(self.root / name, doomed)
                except OSError as exc:
                    log.warning("could not rotate away checkpoint %s (%s); it stays", name, _describe_os_error(exc))
                    continue
                try:
                    shutil.rmtree(doomed)
                except OSError as exc:
                    log.warning(
                        "could not delete %s (%s); the next start removes it", doomed.name, _describe_os_error(exc)
                    )


# fields of the checkpoint's config.json that a scratch model's `model` config fixes
SHAPE_FIELDS = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "n_positions": "block_size"}


def check_loadable(root: Path, target: Path | None, model_cfg: Any, verify: str = "sha256") -> Path:
    """Before anything is written: the checkpoint a resume would load, refused if it cannot load.

    Picks `target` or the newest checkpoint whose files have their manifest sizes (the job hashes
    them; a corrupt one found there is moved aside and the next used), then refuses one whose model
    shape differs from `model_cfg` (the config of record's `model` section, for a scratch model), whose
    config.json does not read or whose optimizer state holds anything but tensors. Cheap: the tensors
    themselves are not read. A newest checkpoint refused so that fails `verify` (checkpoint.verify) too
    is corrupt behind intact sizes: the job would move it aside and load the one before, which is
    checked in its place (with verify=size the job loads it, and fails: it is refused here).
    """
    corrupt: dict[Path, str] = {}
    while True:
        path = find_verified(root, "size", target, corrupt=corrupt)
        try:
            return _check_loadable(path, model_cfg)
        except CheckpointError:
            reason = verify_checkpoint(path, verify)
            if reason is None:
                raise
            if target is not None:  # a named checkpoint never silently becomes another one
                raise CheckpointError(f"checkpoint {path} failed verification: {reason}") from None
            log.warning("checkpoint %s failed verification: %s", path, reason)
            corrupt[path] = reason


def _check_loadable(path: Path, model_cfg: Any) -> Path:
    import torch

    if model_cfg.init == "scratch":
        try:
            saved = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
            raise CheckpointError(f"checkpoint {path} has an unreadable config.json ({exc})") from None
        differ = [
            f"{key} {saved.get(field)} in the checkpoint, {model_cfg[key]} in config.yaml"
            for field, key in SHAPE_FIELDS.items()
            if saved.get(field) != model_cfg[key]
        ]
        if differ:
            raise CheckpointError(
                f"checkpoint {path} does not match the model its config describes ({'; '.join(differ)}); "
                "resume with the run's own config"
            )
    if is_sharded(path):  # written by several processes: DCP's pickled metadata through a strict unpickler
        read_dcp_metadata(path / OPTIMIZER_DIR / ".metadata")
        if not (path / OTHER_TENSORS).is_file():
            return path
    optimizer_file = path / (OTHER_TENSORS if is_sharded(path) else OPTIMIZER_FILE)
    try:  # mmap (zip files only): just the pickle is read, by the weights_only unpickler, not the tensors
        mmap = zipfile.is_zipfile(optimizer_file)
        torch.load(optimizer_file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # the unpickler refuses with several kinds of error
        raise CheckpointError(
            f"{optimizer_file} holds something other than tensors and plain values; refusing to "
            f"unpickle it ({str(exc).splitlines()[0][:160]})"
        ) from None
    return path


class RankFailed(Exception):
    """Another rank's save failed with something other than an I/O error (a bug, raised there with its
    traceback): this rank stops as well, rather than go on as after a failed save."""


Report = tuple[int | None, str, bool]  # a failure as another rank hears of it: errno, message, an I/O error


def _failure_report(exc: BaseException | None) -> Report | None:
    """What another rank needs to fail a save the same way."""
    if exc is None:
        return None
    message = str(exc).splitlines()[0] if str(exc) else repr(exc)
    return exc.errno if isinstance(exc, OSError) else None, message, isinstance(exc, (OSError, RuntimeError))


def _attempt(action: Callable[[], Any]) -> Exception | None:
    """What `action` raised, if anything: kept until every rank has heard of it."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised
        return exc
    return None


def _raise_first(own: BaseException | None, reports: list[Report | None]) -> None:
    """Fail the save on this rank as on every other: a bug on any rank (not an I/O error) stops them all
    (raised where it happened, RankFailed elsewhere); else an I/O failure, this rank's own first."""
    failed = [report for report in reports if report is not None]
    bug = next((report for report in failed if not report[2]), None)
    if own is not None and (bug is None or not isinstance(own, (OSError, RuntimeError))):
        raise own
    if bug is not None or failed:
        raise _failure_from_report(bug or failed[0])


def _failure_from_report(report: Report) -> Exception:
    code, message, io_error = report
    if not io_error:
        return RankFailed(f"another rank failed: {message}")
    return OSError(code, os.strerror(code)) if code is not None else RuntimeError(f"another rank failed: {message}")


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def checkpoint_size(path: Path) -> int:
    return sum(entry["size"] for entry in manifest_files(path).values())


def newest_step(root: Path) -> int | None:
    checkpoints = list_checkpoints(root)
    return step_of(checkpoints[-1]) if checkpoints else None
