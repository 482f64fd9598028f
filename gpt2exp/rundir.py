"""The run-dir contract: config of record, run.json, the run lock, and resume-target checks.

<run dir>/config.yaml    the resolved config of record, written once at the first launch
<run dir>/run.json       run id, W&B id, status, git sha, versions, parent, resumes
<run dir>/.lock          an OS file lock held while a process trains here
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpt2exp.errors import UserError

CONFIG_OF_RECORD = "config.yaml"
RUN_JSON = "run.json"
CHECKPOINTS = "checkpoints"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config_of_record(run_dir: Path, cfg: DictConfig) -> None:
    write_atomic(run_dir / CONFIG_OF_RECORD, OmegaConf.to_yaml(cfg, resolve=True))


def read_config_of_record(run_dir: Path) -> DictConfig:
    from gpt2exp.config import typed

    return typed(OmegaConf.load(run_dir / CONFIG_OF_RECORD))


def config_digest(cfg: DictConfig) -> str:
    """sha256 of the values of record that a resume may not change (whitelisted keys left out)."""
    import hashlib

    fixed = {k: v for k, v in sorted(leaves(cfg).items()) if not is_resumable_key(k)}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()


# -- run.json ------------------------------------------------------------------------------------


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> str:
    from gpt2exp import __version__

    sha = git_sha()
    return f"{__version__}+g{sha[:12]}" if sha else __version__


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("gpt2exp", "torch", "transformers", "hydra-core", "wandb"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def read_run_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def update_run_json(run_dir: Path, **fields: Any) -> dict[str, Any]:
    info = read_run_json(run_dir)
    info.update(fields)
    write_atomic(run_dir / RUN_JSON, json.dumps(info, indent=2) + "\n")
    return info


def start_run_json(run_dir: Path, parent: str | None = None) -> dict[str, Any]:
    """A fresh run's record: new ids, status running."""
    run_id = uuid.uuid4().hex[:12]
    return update_run_json(
        run_dir,
        run_id=run_id,
        wandb_id=run_id,
        status="running",
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        git_sha=git_sha(),
        versions=package_versions(),
        parent=parent,
        resumes=[],
    )


# -- the lock ------------------------------------------------------------------------------------


class RunLock:
    """An exclusive flock on <run dir>/.lock; the OS drops it when the process dies, even by SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(in_use_message(self.path.parent, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: Path) -> str | None:
    """The pid of the process training in `run_dir`, or None; only reads, so a finished run stays untouched."""
    path = run_dir / ".lock"
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_unlocked(run_dir: Path) -> None:
    """Fail now (before anything is written) if another process trains in `run_dir`."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise UserError(in_use_message(run_dir, holder))


def in_use_message(run_dir: Path, holder: str) -> str:
    return f"run dir {run_dir} is in use by another process (pid {holder}); wait for it to finish or stop it first"


def run_status(run_dir: Path) -> str | None:
    """run.json's status, with `running` read as `interrupted` when no process holds the run's lock."""
    status = read_run_json(run_dir).get("status")
    if status == "running" and lock_holder(run_dir) is None:
        return "interrupted"  # killed (SIGKILL, OOM, power loss) before it could say so
    return status


def refuse_existing_run(run_dir: Path) -> None:
    """A fresh start must not overwrite another run's record, metrics or checkpoints."""
    if is_run_dir(run_dir):
        raise UserError(
            f"{run_dir} already holds a run; continue it with resume={run_dir} (or resume=auto), "
            "or choose another hydra.run.dir"
        )


# -- resume targets ------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_OF_RECORD).is_file() and (path / RUN_JSON).is_file()


@dataclass
class ResumeTarget:
    run_dir: Path
    checkpoint: Path | None  # a specific checkpoint dir, or None for the run's newest good one


def resume_target(resume: str, fixed_run_dir: Path | None) -> ResumeTarget | None:
    """Where `resume=<value>` points; None means `auto` found nothing to resume (start fresh).

    Raises UserError for a path that does not exist, is not a run dir, or holds no checkpoint.
    """
    from gpt2exp.checkpoint import is_checkpoint_dir, list_checkpoints

    if resume == "auto":
        if fixed_run_dir is None:
            raise UserError("resume=auto needs a fixed run dir: add hydra.run.dir=<dir> to the command")
        if is_run_dir(fixed_run_dir) and list_checkpoints(fixed_run_dir / CHECKPOINTS):
            return ResumeTarget(fixed_run_dir.resolve(), None)
        return None
    path = Path(os.path.expanduser(resume))
    if not path.exists():
        raise UserError(f"resume path does not exist: {resume}; pass a run dir or a checkpoint dir")
    path = path.resolve()
    if is_checkpoint_dir(path) and is_run_dir(path.parent.parent):
        return ResumeTarget(path.parent.parent, path)
    if not is_run_dir(path):
        raise UserError(
            f"{resume} is not a gpt2exp run dir (no {CONFIG_OF_RECORD} and {RUN_JSON}) nor a sweep dir (no "
            "multirun.yaml); pass a run dir such as outputs/<date>/<time>, one of its checkpoints/step_* dirs, "
            "or a sweep dir such as multirun/<date>/<time>"
        )
    if not list_checkpoints(path / CHECKPOINTS):
        raise UserError(f"run dir {resume} has no checkpoints to resume from; start a new run instead")
    return ResumeTarget(path, None)


# -- resume overrides ----------------------------------------------------------------------------

# Keys a resume command may change: none of them alters the math of steps already planned.
# (trainer.num_threads and device change floating-point bits, not meaning: allowed, documented.)
RESUMABLE_KEYS = (
    "resume",
    "device",
    "trainer.max_steps",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.sample_every",
    "trainer.num_samples",
    "trainer.sample_tokens",
    "trainer.progress",
    "trainer.num_threads",
    "data.cache_dir",
    "checkpoint",
    "logger",
)


def is_resumable_key(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b`; `~a` -> `a`; `model=gpt2_mini` -> `model`."""
    return override.split("=", 1)[0].lstrip("+~")


def leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config to {dotted key: value}."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: cfg}


def forbidden_changes(record: DictConfig, with_overrides: DictConfig, without_overrides: DictConfig) -> list[str]:
    """Keys the command line's overrides touch, outside the whitelist, whose value differs from the record."""
    record_leaves, new, old = leaves(record), leaves(with_overrides), leaves(without_overrides)
    touched = {k for k in new.keys() | old.keys() if new.get(k) != old.get(k)}
    return sorted(key for key in touched if not is_resumable_key(key) and new.get(key) != record_leaves.get(key))


def config_for_resume(record: DictConfig, current: DictConfig, overrides: list[str]) -> DictConfig:
    """The config of record with the whitelisted keys this command overrides taken from `current`."""
    cfg = record.copy()
    for override in overrides:
        key = override_key(override)
        if key == "resume" or key.startswith("hydra") or not is_resumable_key(key):
            continue
        value = OmegaConf.select(current, key)
        OmegaConf.update(cfg, key, value, merge=False)
    for key in ("logger.group", "logger.name"):  # a sweep job keeps its W&B group and name under a new logger
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, OmegaConf.select(record, key), merge=False)
    cfg.resume = current.resume
    return cfg


def fix_values_of_record(cfg: DictConfig, num_threads: int) -> DictConfig:
    """Resolve what a resume must not re-derive: the schedule's horizon and the CPU thread count."""
    cfg = cfg.copy()
    if cfg.scheduler.decay_steps is None:
        cfg.scheduler.decay_steps = cfg.trainer.max_steps
    if cfg.trainer.num_threads is None:
        cfg.trainer.num_threads = num_threads
    return cfg
