"""The files of one checkpoint dir, below the manager that commits them (checkpoint.py) and the
layout written by several processes (checkpoint_sharded.py): writing a file fsynced and hashed as it
streams out, the safetensors and weights_only torch formats, and restoring the objects they hold.

Nothing here knows about temporary dirs, manifests, `latest` or rotation: that is the manager's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from gpt2exp.errors import UserError
from gpt2exp.state import Stateful, StateKind, group_by_kind

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
MODEL_KEY = "model"  # the stateful entry that is the HF model itself, saved in the HF layout


class CheckpointError(UserError):
    """No checkpoint could be loaded (none verifies, it does not fit the model, it holds a pickle); the
    message says which and why."""


# -- writing one file, fsynced and hashed ------------------------------------------------------------


def io_pool() -> ThreadPoolExecutor:
    """The two threads a checkpoint's files are written with (`HashingFile`): one hashes, one syncs."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-io")


class HashingFile:
    """A write-only file that sha256-hashes what passes through it, the hash running beside the write,
    and that is written back to the disk while it is still being written.

    Each large piece is hashed on a pool thread while this thread writes it (both release the GIL),
    and the call returns only when both are done, so a caller may reuse its buffer at once. Every
    SYNC_EVERY bytes the other pool thread starts an fdatasync of what is written so far: the disk
    writes while the rest is serialised and hashed, and the final fsync has only the tail left
    (without it the page cache holds the whole file until that fsync, which then runs alone).
    """

    SMALL = 1 << 16  # below this, hashing inline costs less than handing over to the thread
    SYNC_EVERY = 1 << 27  # 128 MiB

    def __init__(self, path: Path, pool: ThreadPoolExecutor):
        self._file = open(path, "wb")
        self._digest = hashlib.sha256()
        self._pool = pool  # two workers (io_pool): at most one hash and one sync of this file at a time
        self._sync: Future[None] | None = None
        self._unsynced = 0
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        pending: Future[None] | None = None
        if view.nbytes >= self.SMALL:
            pending = self._pool.submit(self._digest.update, view)
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
        self._unsynced += view.nbytes
        if self._unsynced >= self.SYNC_EVERY and (self._sync is None or self._sync.done()):
            self._wait_sync()  # a failed write-back (EIO, ENOSPC) is raised here
            self._sync, self._unsynced = self._pool.submit(os.fdatasync, self._file.fileno()), 0
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> dict[str, Any]:
        self._file.flush()
        self._wait_sync()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"size": self.size, "sha256": self._digest.hexdigest()}

    def close(self) -> None:
        """Close after a failure: the descriptor outlives the sync that uses it."""
        try:
            self._wait_sync()
        except OSError:
            pass  # the failure being handled is the one to report
        finally:
            self._file.close()

    def _wait_sync(self) -> None:
        sync, self._sync = self._sync, None
        if sync is not None:
            sync.result()


def write_file(path: Path, data: bytes | Callable[[Any], None], pool: ThreadPoolExecutor) -> dict[str, Any]:
    """Write `data` (bytes, or a function that writes into a file object) to `path`, fsynced and hashed.

    Returns the file's manifest entry. Streaming through the file object keeps no second copy of
    large state in memory.
    """
    out = HashingFile(path, pool)
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


def safetensors_writer(tensors: dict[str, Any], metadata: dict[str, str]) -> Callable[[Any], None]:
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


# -- tensor state (optimizer, scaler) and the model's weights -------------------------------------


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


def model_tensors(model, on_cpu: bool = True) -> dict[str, Any]:
    """The model's whole weights (on the CPU, or where they live), tied duplicates dropped (HF re-ties
    them on load).

    A DTensor (FSDP2) is gathered with `full_tensor()`, a collective: under torchrun every rank
    must call this. Ties are recognised by the storage of the tensor each rank holds.
    """
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        # duck-typed: DTensor's import path moved between torch releases
        sharded = hasattr(tensor, "full_tensor")
        local = tensor.to_local() if sharded else tensor
        key = local.untyped_storage().data_ptr() if local.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        whole = tensor.full_tensor() if sharded else tensor
        tensors[name] = whole.detach().to("cpu").contiguous() if on_cpu else whole.detach()
    return tensors


class CheckpointFiles(Protocol):
    """Turns the stateful set into the files of one checkpoint dir, and back."""

    def write(
        self, tmp_dir: Path, step: int, stateful: Mapping[str, Any], extra_json: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """Write every file into `tmp_dir`, each fsynced; returns {relative path: manifest entry}."""
        ...

    def read(self, path: Path, stateful: Mapping[str, Any]) -> dict[str, Any]:
        """Restore `stateful` from the verified checkpoint `path`; returns its trainer_state."""
        ...

    def close(self) -> None: ...


def split_stateful(stateful: Mapping[str, Any]) -> tuple[Any, dict[StateKind, dict[str, Stateful]]]:
    """The model, and every other entry grouped by its `state_kind` (None entries left out)."""
    return stateful[MODEL_KEY], group_by_kind({k: v for k, v in stateful.items() if k != MODEL_KEY})


def build_trainer_state(json_objects: Mapping[str, Stateful], step: int, extra_json: dict[str, Any]) -> dict[str, Any]:
    """The content of trainer_state.json: each "json" object's state under its key, then the metadata."""
    clashes = set(json_objects) & ({"step"} | set(extra_json))
    if clashes:
        raise ValueError(f"stateful entries {sorted(clashes)} would overwrite checkpoint metadata")
    return {**{k: obj.state_dict() for k, obj in json_objects.items()}, "step": step, **extra_json}


def write_pretrained_files(
    write: Callable[[str, bytes | Callable[[Any], None]], None], weights: dict[str, Any], config: Any, tokenizer_dir
) -> None:
    """What `from_pretrained` reads: model.safetensors (streamed), config.json and the tokenizer's files."""
    write(MODEL_FILE, safetensors_writer(weights, metadata={"format": "pt"}))
    write("config.json", config.to_json_string().encode())
    if tokenizer_dir is not None:
        for source in sorted(Path(tokenizer_dir).iterdir()):
            if source.is_file():
                write(source.name, source.read_bytes())


def check_json_state(groups: Mapping[str, Mapping[str, Any]], state: Mapping[str, Any]) -> None:
    """Before anything is restored: each "json" object that checks a saved state (`check_state_dict`:
    the sampler's position, against its data) refuses one that is not its own, so a refused checkpoint
    leaves every object as it was and costs no restore."""
    for key, obj in groups["json"].items():
        check = getattr(obj, "check_state_dict", None)
        if check is not None and key in state:
            check(state[key])


def restore_model(path: Path, model, weights: dict[str, Any]) -> None:
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


def _mismatch_summary(exc: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
    return lines[0] if lines else str(exc).splitlines()[0]
