"""The run-dir contract: config of record, run.json and its statuses, the run lock.

<run dir>/config.yaml    the resolved config of record, written once at the first launch
<run dir>/run.json       run id, W&B id, status, git sha, versions, parent, resumes
<run dir>/.lock          an OS file lock held while a process trains here
<run dir>/checkpoints/   the checkpoints, unless checkpoint.dir puts them in <checkpoint.dir>/<run id>/;
                         run.json records where (`checkpoints_root` reads it; every reader goes through it)

A launch refused after Hydra made or entered the run dir takes back what it added (`Footprint`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2exp.errors import UserError

if TYPE_CHECKING:  # omegaconf is imported where used: checkpoint.py and the small CLIs import this module
    from omegaconf import DictConfig

CONFIG_OF_RECORD = "config.yaml"
RUN_JSON = "run.json"
CHECKPOINTS = "checkpoints"  # the checkpoints' dir inside the run dir, and run.json's key for where they are
CHECKPOINTS_OWNER = "run_dir"  # in a checkpoints dir outside its run dir: a text file naming that run dir


class RunStatus(StrEnum):
    """run.json's `status`. `interrupted` is never written: it is how a `running` run whose process is gone reads."""

    running = "running"
    completed = "completed"
    early_stopped = "early_stopped"  # val/loss stopped improving (trainer.early_stop_patience): done, like completed
    failed = "failed"
    preempted = "preempted"
    diverged = "diverged"
    pruned = "pruned"  # an Optuna trial its study's pruner stopped (saved; exit 0); done, the study goes on
    interrupted = "interrupted"


def timestamp(at: float | None = None, for_name: bool = False) -> str:
    """Local time (now, or the epoch seconds `at`): ISO 8601 with its UTC offset for records and
    people, `YYYYmmdd-HHMMSS` inside file and dir names. The project's one time format."""
    return time.strftime("%Y%m%d-%H%M%S" if for_name else "%Y-%m-%dT%H:%M:%S%z", time.localtime(at))


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config_of_record(run_dir: Path, cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    write_atomic(run_dir / CONFIG_OF_RECORD, OmegaConf.to_yaml(cfg, resolve=True))


def read_config_of_record(run_dir: Path) -> DictConfig:
    import yaml
    from omegaconf import OmegaConf

    from gpt2exp.config import typed

    path = run_dir / CONFIG_OF_RECORD
    try:
        return typed(OmegaConf.load(path))
    except (yaml.YAMLError, UnicodeDecodeError, UserError) as exc:
        raise UserError(f"{path} does not read as the run's config of record ({_first_line(exc)}); restore it "
                        "(a resume rebuilds the run from it)") from None  # fmt: skip


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
    for name in ("gpt2exp", "torch", "transformers", "tokenizers", "hydra-core", "wandb"):  # tokenizers trains the BPE
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def read_run_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_JSON
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
        problem = None if isinstance(info, dict) else "not a JSON object"
    except ValueError as exc:  # not UTF-8, not JSON
        problem = _first_line(exc)
    if problem is not None:
        raise UserError(f"{path} does not read as the run's record ({problem}); restore it "
                        "(it holds the run's id, W&B id and status)")  # fmt: skip
    return info


def _first_line(what: object) -> str:
    return str(what).splitlines()[0][:160] if str(what) else type(what).__name__


def update_run_json(run_dir: Path, **fields: Any) -> dict[str, Any]:
    info = read_run_json(run_dir)
    info.update(fields)
    write_atomic(run_dir / RUN_JSON, json.dumps(info, indent=2) + "\n")
    return info


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def start_run_json(
    run_dir: Path,
    parent: str | None = None,
    world: dict[str, Any] | None = None,
    requested: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh run's record: new ids, status running, where its checkpoints go (`place_checkpoints`,
    from the config of record, which is written first), the processes it trains on (`world`:
    world_size and strategy; each resume records its own in `resumes`) and what its command asked of
    the keys recorded as what ran (`requested`, config.requested_values)."""
    run_id = new_run_id()
    return update_run_json(
        run_dir,
        run_id=run_id,
        wandb_id=run_id,
        status=RunStatus.running,
        started_at=timestamp(),
        git_sha=git_sha(),
        versions=package_versions(),
        parent=parent,
        resumes=[],
        checkpoints=place_checkpoints(run_dir, run_id),
        **({"world": world} if world is not None else {}),
        **({"requested": requested} if requested is not None else {}),
    )


# -- where the checkpoints are -------------------------------------------------------------------


def checkpoints_location(setting: str | None, run_id: str) -> Path | None:
    """Where `checkpoint.dir=setting` puts the checkpoints of run `run_id`: `<setting>/<run id>` as an
    absolute path (`~` expanded, a relative path taken from the current dir); None for the run dir's own."""
    if setting is None:
        return None
    return Path(os.path.abspath(os.path.expanduser(setting))) / run_id


def check_checkpoints_dir(setting: str | None) -> None:
    """Before anything is written: `checkpoint.dir` must be a dir this process can make and write in."""
    if setting is not None:
        check_writable_dir("checkpoint.dir", setting, "checkpoints")


def check_writable_dir(key: str, setting: str, what: str, readable: bool = False) -> None:
    """`key=setting` must name a dir this process can make (its nearest existing ancestor a writable
    dir) or write in (`readable`: or an existing dir it can read, which may hold what is needed):
    refused in one line otherwise, before anything is written."""
    path = Path(os.path.abspath(os.path.expanduser(setting)))
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{key}={setting}: {existing} is not a directory; name a directory for {what}")
    if readable and existing == path and os.access(path, os.R_OK | os.X_OK):
        return
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={setting}: {existing} is not writable; name a directory you can write in")


def place_checkpoints(run_dir: Path, run_id: str) -> str:
    """Make the checkpoints dir of a run starting now; returns it as run.json records it.

    `checkpoints` (relative: inside the run dir, which may be copied or moved), or with `checkpoint.dir`
    set in the config of record the absolute `<checkpoint.dir>/<run id>`, which also gets a
    CHECKPOINTS_OWNER file naming its run dir (so a checkpoint dir there still names its run).
    """
    setting = read_config_of_record(run_dir).checkpoint.dir if (run_dir / CONFIG_OF_RECORD).is_file() else None
    location = checkpoints_location(setting, run_id)
    if location is None:
        (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
        return CHECKPOINTS
    try:
        location.mkdir(parents=True, exist_ok=True)
        write_atomic(location / CHECKPOINTS_OWNER, f"{run_dir.resolve()}\n")
    except OSError as exc:  # the launcher checked the dir; a disk can still refuse (a UserError takes the run back)
        raise UserError(f"checkpoint.dir={setting}: cannot make {location} ({exc.strerror or exc})") from None
    return str(location)


def checkpoints_root(run_dir: Path) -> Path:
    """Where the run in `run_dir` keeps its checkpoints: the location its run.json records (absolute
    for checkpoint.dir, else relative to the run dir), or `<run dir>/checkpoints` for a run recorded
    before checkpoint.dir existed (and a dir that holds no run yet). Every reader finds them here."""
    recorded = read_run_json(run_dir).get(CHECKPOINTS)
    return run_dir / (recorded if isinstance(recorded, str) and recorded else CHECKPOINTS)


def existing_checkpoints_root(run_dir: Path) -> Path:
    """`checkpoints_root`, refused (UserError) when it lies outside the run dir and is gone.

    A wiped or unmounted scratch disk must not read as a run that never saved a checkpoint: that
    would restart it from step 0 (or start it fresh under resume=auto) over its own record.
    """
    root = checkpoints_root(run_dir)
    if not root.is_dir() and run_dir not in root.parents:
        raise UserError(
            f"the checkpoints of run {run_dir} are recorded (run.json) at {root}, which does not exist; "
            "mount or restore that disk and try again, or start a new run"
        )
    return root


def run_of_checkpoints(root: Path) -> Path | None:
    """The run dir whose checkpoints are in the dir `root`: the run dir around it (`<run dir>/checkpoints`),
    or the one its CHECKPOINTS_OWNER file names (checkpoint.dir), as long as that run's record points
    back at `root`; None for a folder of checkpoints that belongs to no run."""
    root = root.resolve()
    candidates = [root.parent]
    try:
        candidates.append(Path((root / CHECKPOINTS_OWNER).read_text(encoding="utf-8").strip()))
    except OSError:
        pass
    for run_dir in candidates:
        try:
            if is_run_dir(run_dir) and checkpoints_root(run_dir).resolve() == root:
                return run_dir
        except (OSError, ValueError, UserError):  # an unreadable run.json claims nothing
            continue
    return None


# -- the lock ------------------------------------------------------------------------------------


class RunLock:
    """An exclusive flock on <run dir>/.lock; the OS drops it when the process dies, even by SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:  # already held: taken by the launcher, entered again by the job
            return self
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

    @property
    def held(self) -> bool:
        return self._fd is not None

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


def run_status(run_dir: Path) -> RunStatus | None:
    """run.json's status, with `running` read as `interrupted` when no process holds the run's lock."""
    status = read_run_json(run_dir).get("status")
    if status is None:
        return None
    if status == RunStatus.running and lock_holder(run_dir) is None:
        return RunStatus.interrupted  # killed (SIGKILL, OOM, power loss) before it could say so
    return RunStatus(status)


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_OF_RECORD).is_file() and (path / RUN_JSON).is_file()


# -- what a launch adds to a run dir -------------------------------------------------------------

HYDRA_FILES = frozenset({".hydra", "train.log"})  # what Hydra writes into a run dir before the job starts


@dataclass(frozen=True)
class Footprint:
    """What one launch adds to a run dir, so that a launch refused in its job (exit 2) leaves no trace.

    `before` holds the run dir's entries from before the launch (None: the launch made the dir, and
    `top`, the outermost dir it made, is removed too when nothing else is in it); `also` names what
    the launch adds inside those entries (`.hydra/resume-<stamp>`). Only taken back by the process
    that holds the run's lock: what another process made is never touched.
    """

    run_dir: Path
    before: frozenset[str] | None
    top: Path
    also: tuple[str, ...] = ()

    @classmethod
    def before_launch(cls, run_dir: Path, also: tuple[str, ...] = ()) -> Footprint:
        """Noted by the launcher, before Hydra writes anything."""
        run_dir = run_dir.resolve()
        if run_dir.is_dir():
            return cls(run_dir, frozenset(os.listdir(run_dir)), run_dir, also)
        top = run_dir
        while not top.parent.exists():
            top = top.parent
        return cls(run_dir, None, top, also)

    @classmethod
    def at_job_start(cls, run_dir: Path, stop: Path, also: tuple[str, ...] = ()) -> Footprint:
        """Noted by a job whose dir Hydra chose: a dir holding only Hydra's files was made by this launch,
        and so were the parents (below `stop`) that hold nothing else."""
        run_dir, stop = run_dir.resolve(), stop.resolve()
        if not run_dir.is_dir():
            return cls.before_launch(run_dir, also)
        names = frozenset(os.listdir(run_dir))
        if not names <= HYDRA_FILES:
            return cls(run_dir, names, run_dir, also)
        top = run_dir
        while top.parent != stop and stop in top.parent.parents and os.listdir(top.parent) == [top.name]:
            top = top.parent
        return cls(run_dir, None, top, also)

    def erase(self) -> None:
        """Remove what the launch added; call it while holding the run's lock."""

        def remove(path: Path) -> None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

        if self.before is None:
            remove(self.run_dir)
            self.prune()
            return
        for name in sorted(set(os.listdir(self.run_dir)) - self.before):
            remove(self.run_dir / name)
        for relative in self.also:
            remove(self.run_dir / relative)

    def prune(self) -> None:
        """Remove the dirs the launch made, up to `top`, as far as they are empty (safe without the lock)."""
        if self.before is not None:
            return
        path = self.run_dir
        while path != self.top.parent:
            try:
                path.rmdir()  # only while empty: never another process's files
            except FileNotFoundError:
                pass
            except OSError:
                break
            path = path.parent
