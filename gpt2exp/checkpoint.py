"""CheckpointManager: the only code that reads or writes checkpoint files.

    checkpoints/step_00000200/
      model.safetensors config.json   GPT2LMHeadModel.from_pretrained(dir) works
      tokenizer.json ...              AutoTokenizer.from_pretrained(dir) works
      optimizer.pt                    optimizer + grad scaler; tensors only (torch.load weights_only=True)
      trainer_state.json              counters, sampler, schedule, RNG, W&B id, config hash, metrics
      manifest.json                   size + sha256 of every file above; written last
    checkpoints/latest                names the newest committed checkpoint
    checkpoints/corrupt/              checkpoints that failed verification, kept for inspection

A save writes into a hidden temporary sibling, fsyncs every file, writes the manifest, renames the
directory into place, fsyncs the parent, replaces `latest` atomically, and only then rotates old
checkpoints away. A directory without a valid manifest is not a checkpoint.
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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2exp.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
LATEST = "latest"
CORRUPT = "corrupt"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
MANIFEST_VERSION = 1
# keys of the stateful set that go to optimizer.pt (tensors); everything else but the model is JSON
TENSOR_STATE_KEYS = ("optimizer", "scaler")


class CheckpointError(UserError):
    """A checkpoint could not be written or none could be loaded; the message says which and why."""


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
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_checkpoint_dir(p)), key=step_of)


# -- writing and verifying files -----------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file that sha256-hashes what passes through it, the hash running beside the write.

    Each large piece is hashed on the hash thread while this thread writes it (both release the
    GIL), and the call returns only when both are done, so a caller may reuse its buffer at once.
    """

    SMALL = 1 << 16  # below this, hashing inline costs less than handing over to the thread

    def __init__(self, path: Path, hasher: ThreadPoolExecutor):
        self._file = open(path, "wb")
        self._digest = hashlib.sha256()
        self._hasher = hasher
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        pending: Future[None] | None = None
        if view.nbytes >= self.SMALL:
            pending = self._hasher.submit(self._digest.update, view)
        else:
            self._digest.update(view)
        try:
            self._file.write(view)
        except OSError as exc:
            self.error = exc  # serializers may wrap it; the manager reports the original
            raise
        finally:
            if pending is not None:
                pending.result()
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> dict[str, Any]:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"size": self.size, "sha256": self._digest.hexdigest()}

    def close(self) -> None:
        self._file.close()


def _write_file(path: Path, data: bytes | Callable[[Any], None], hasher: ThreadPoolExecutor) -> dict[str, Any]:
    """Write `data` (bytes, or a function that writes into a file object) to `path`, fsynced and hashed.

    Returns the file's manifest entry. Streaming through the file object keeps no second copy of
    large state in memory.
    """
    out = _HashingFile(path, hasher)
    try:
        if callable(data):
            data(out)
        else:
            out.write(data)
        return out.finish()
    except RuntimeError:
        out.close()
        if out.error is not None:  # e.g. torch.save wraps ENOSPC in a RuntimeError
            raise out.error from None
        raise
    except BaseException:
        out.close()
        raise


def _safetensors_writer(tensors: dict[str, Any], metadata: dict[str, str]) -> Callable[[Any], None]:
    """Write `tensors` in the safetensors format piece by piece, straight from tensor memory."""
    import struct

    import torch

    dtypes = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL",
    }  # fmt: skip
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtypes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes

    def write(out: Any) -> None:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            if tensor.numel():
                out.write(tensor.reshape(-1).view(torch.uint8).numpy())

    return write


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_checkpoint(path: Path, mode: str = "sha256") -> str | None:
    """None if `path` matches its manifest, else the reason it does not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
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
) -> Path:
    """`target` if given (it must verify: a named checkpoint never silently becomes another one),
    else the newest checkpoint under `root` that verifies.

    Each one that fails is logged and handed to `on_corrupt`; if none verifies, the CheckpointError
    lists what was tried.
    """
    candidates = [target] if target is not None else list(reversed(list_checkpoints(root)))
    tried = []
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


# -- tensor state (optimizer, scaler) ------------------------------------------------------------


def tensor_state_writer(state: dict[str, Any]) -> Callable[[Any], None]:
    """torch.save of `state` streamed into a file object; the manifest's sha256 stands in for the CRC32."""
    import torch
    import torch.utils.serialization

    def write(out: Any) -> None:
        with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
            torch.save(state, out)

    return write


def load_tensor_state(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a pickled object is refused and its code never runs."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise CheckpointError(
            f"{path} holds something other than tensors and plain values; refusing to unpickle it "
            f"({str(exc).splitlines()[0][:160]})"
        ) from None


def model_tensors(model) -> dict[str, Any]:
    """The model's state dict with tied duplicates dropped (HF re-ties them on load)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


# -- retention ----------------------------------------------------------------------------------


def manifest_metric(path: Path, metric: str) -> float | None:
    try:
        value = json.loads((path / MANIFEST).read_text())["metrics"].get(metric)
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return float(value) if value is not None else None


def kept_reasons(root: Path, cfg: Any) -> dict[str, list[str]]:
    """Why each committed checkpoint under `root` stays (last/best/milestone); [] means rotate it away.

    The newest is always kept; a NaN metric never ranks as best.
    """
    checkpoints = list_checkpoints(root)
    reasons: dict[str, list[str]] = {p.name: [] for p in checkpoints}
    if not checkpoints:
        return reasons
    for path in checkpoints[-max(1, cfg.keep_last) :]:
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


@dataclass
class Loaded:
    path: Path
    step: int
    trainer_state: dict[str, Any]


class CheckpointManager:
    """save / load / close; `_should_save` decides when, `_rotate` decides what stays."""

    def __init__(
        self, cfg: Any, run_dir: Path, tokenizer_dir: Path | None = None, identity: dict[str, Any] | None = None
    ):
        """`identity` (config hash, code version, ...) is recorded in every trainer_state.json."""
        self.cfg = cfg
        self.root = Path(run_dir) / "checkpoints"
        self.tokenizer_dir = tokenizer_dir
        self.identity = dict(identity or {})
        self.root.mkdir(parents=True, exist_ok=True)
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash")
        self._last_save_time = time.monotonic()
        self._clean_leftovers()

    # -- public API

    def save(
        self, step: int, stateful: dict[str, Any], metrics: dict[str, float], *, force: bool = False
    ) -> Path | None:
        """Commit a checkpoint of `stateful` at `step` if due (or `force`); returns its dir, or None.

        On an I/O failure the partial directory is removed, earlier checkpoints are untouched, and
        a CheckpointError is raised (on_save_error=stop) or logged (on_save_error=warn).
        """
        if not force and not self._should_save(step):
            return None
        final = self.root / step_dir_name(step)
        if is_checkpoint_dir(final):
            return final  # this step is already committed (e.g. a signal right after a periodic save)
        start = time.monotonic()
        try:
            self._commit(step, stateful, metrics, final)
        except (OSError, RuntimeError) as exc:
            message = (
                f"checkpoint {final.name} was not saved: {_describe_os_error(exc)} in {self.root}; "
                "earlier checkpoints are intact"
            )
            if self.cfg.on_save_error == "warn":
                log.warning("%s (training goes on: checkpoint.on_save_error=warn)", message)
                return None
            raise CheckpointError(message + "; free space or fix permissions, then resume") from exc
        self._last_save_time = time.monotonic()
        log.info("saved checkpoint %s in %.2fs", final.name, time.monotonic() - start)
        self._rotate()
        return final

    def load(self, stateful: dict[str, Any], target: Path | None = None) -> Loaded:
        """Load `target` (or the newest checkpoint that verifies) into `stateful`."""
        path = self.find_good(target)
        loaded = self._load_into(path, stateful)
        log.info("loaded checkpoint %s", path)
        return loaded

    def close(self) -> None:
        self._hasher.shutdown(wait=True)

    # -- finding a good checkpoint

    def find_good(self, target: Path | None = None) -> Path:
        """`target` if given and it verifies; else the newest checkpoint that verifies. Corrupt ones move aside."""
        return find_verified(self.root, self.cfg.verify, target, on_corrupt=self._quarantine)

    def _quarantine(self, path: Path) -> None:
        """Move a corrupt checkpoint out of the step_* namespace: kept for inspection, never loaded."""
        corrupt = self.root / CORRUPT
        corrupt.mkdir(exist_ok=True)
        log.warning("moving %s to %s/ for inspection; it will not be loaded again", path.name, CORRUPT)
        stem = f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        destination, n = corrupt / stem, 1
        while destination.exists():  # the same step may go bad again within the second
            destination, n = corrupt / f"{stem}-{n}", n + 1
        os.replace(path, destination)
        _fsync_dir(self.root)
        self._point_latest_at_newest()

    # -- saving

    def _should_save(self, step: int) -> bool:
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        minutes = (time.monotonic() - self._last_save_time) / 60.0
        return bool(self.cfg.every_minutes) and minutes >= self.cfg.every_minutes

    def _commit(self, step: int, stateful: dict[str, Any], metrics: dict[str, float], final: Path) -> None:
        tmp = self.root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            files = self._write_files(tmp, step, stateful, metrics)
            manifest = {"version": MANIFEST_VERSION, "step": step, "metrics": metrics, "files": files}
            manifest_text = json.dumps(manifest, indent=1).encode()
            with open(tmp / MANIFEST, "wb") as f:
                f.write(manifest_text)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        try:
            self._write_latest(final.name)
        except OSError as exc:  # the checkpoint is committed; `latest` is only a pointer for people
            log.warning("checkpoint %s is saved but %s was not updated: %s", final.name, LATEST, exc)

    def _write_files(
        self, tmp: Path, step: int, stateful: dict[str, Any], metrics: dict[str, float]
    ) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = {}

        def write(name: str, data: bytes | Callable[[Any], None]) -> None:
            files[name] = _write_file(tmp / name, data, self._hasher)

        model = stateful["model"]
        write(MODEL_FILE, _safetensors_writer(model_tensors(model), metadata={"format": "pt"}))
        write("config.json", model.config.to_json_string().encode())
        if self.tokenizer_dir is not None:
            for source in sorted(Path(self.tokenizer_dir).iterdir()):
                if source.is_file():
                    write(source.name, source.read_bytes())
        tensor_state = {k: stateful[k].state_dict() for k in TENSOR_STATE_KEYS if stateful.get(k) is not None}
        write(OPTIMIZER_FILE, tensor_state_writer(tensor_state))
        json_state = {k: v.state_dict() for k, v in stateful.items() if k != "model" and k not in TENSOR_STATE_KEYS}
        json_state.update(self.identity, step=step, metrics=metrics, saved_at=time.time())
        write(STATE_FILE, json.dumps(json_state).encode())
        return files

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

    def _clean_leftovers(self) -> None:
        for path in self.root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                log.info("removing %s, left by an interrupted save", path.name)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    # -- rotation

    def kept(self) -> dict[str, list[str]]:
        return kept_reasons(self.root, self.cfg)

    def _rotate(self) -> None:
        for name, reasons in self.kept().items():
            if not reasons:
                log.info("rotating away checkpoint %s", name)
                shutil.rmtree(self.root / name)

    # -- loading

    def _load_into(self, path: Path, stateful: dict[str, Any]) -> Loaded:
        """Read and check every file first, then restore: a refused file leaves every object untouched."""
        from safetensors.torch import load_file

        weights = load_file(path / MODEL_FILE)
        tensor_state = load_tensor_state(path / OPTIMIZER_FILE)
        trainer_state = json.loads((path / STATE_FILE).read_text())
        model = stateful["model"]
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {path} does not match the model its config describes "
                f"({_mismatch_summary(exc)}); resume with the run's own config"
            ) from None
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise CheckpointError(
                f"checkpoint {path} does not match the model its config describes "
                f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        model.tie_weights()
        for key in TENSOR_STATE_KEYS:
            if stateful.get(key) is not None and key in tensor_state:
                stateful[key].load_state_dict(tensor_state[key])
        for key, obj in stateful.items():
            if key != "model" and key not in TENSOR_STATE_KEYS and key in trainer_state:
                obj.load_state_dict(trainer_state[key])
        return Loaded(path, int(trainer_state["step"]), trainer_state)


def _mismatch_summary(exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
    return lines[0] if lines else str(exc).splitlines()[0]


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def checkpoint_size(path: Path) -> int:
    return sum(entry["size"] for entry in read_manifest(path)["files"].values())


def newest_step(root: Path) -> int | None:
    checkpoints = list_checkpoints(root)
    return step_of(checkpoints[-1]) if checkpoints else None
