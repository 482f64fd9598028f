"""A frozen copy of one step's training state, for a checkpoint written in the background.

The training thread freezes the stateful set in two parts (`freeze`):
- at once, everything small: JSON state, the structure and scalars of each tensor state (the
  optimizer's param groups with their LR), the model config;
- the tensors (weights, optimizer moments): copied into host buffers that are kept and reused from
  save to save, by a copy that runs beside the next forward and backward. On CUDA the buffers are
  pinned and the copy is non-blocking on a side stream; on the CPU a thread copies them as plain
  memory (numpy), never through a torch kernel: a torch op on a second thread starts a second
  intra-op thread team, and the training steps after it ran ~10% slower for the rest of the run
  (gpt2_mini, batch 4, 2 threads: median step 514 -> 565 ms; with the memory copy 509 -> 515 ms).
The next optimizer update, the first thing to change those tensors, waits for the copy
(`HostSnapshot.wait_copied`); the writer waits for it too (`Copy.on_host`). So the checkpoint
holds exactly the state of its step while the loop goes on.

The buffers are views of one host allocation of the state's exact size. On CUDA it is page-locked
with `cudaHostRegister`: torch's pinned allocator rounds each allocation up to a power of two, by
which gpt2_124m's 1.49 GB of weights and AdamW moments took 2.48 GB of page-locked memory as 148
buffers. The copy thread registers it (and unregisters it), so the training thread neither waits for
it nor inherits the CUDA runtime's record of a failed call, which its next kernel launch would raise.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

ALIGNMENT = 64  # each buffer starts on a cache line, so any dtype can view it


class Copy:
    """One copy into host buffers, as the writer waits for it."""

    def __init__(self, future: Future[None] | None, event: Any):
        self._future, self._event = future, event

    def on_host(self) -> None:
        """Block this thread until the buffers hold the copy."""
        if self._event is not None:
            self._event.synchronize()
        if self._future is not None:
            self._future.result()


class HostSnapshot:
    """Reusable host buffers and the copy into them; one copy at a time."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}
        self._layout: tuple[Any, ...] = ()  # the (name, shape, dtype, device) the buffers were made for
        self._host: HostMemory | None = None  # the one allocation the buffers are views of
        self._pinning: Future[None] | None = None  # its page-locking on the copy thread (CUDA)
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-copy")
        self._stream: Any = None
        self._copy: Copy | None = None  # the newest copy, until the training side has waited for it

    def start(self, tensors: Mapping[str, Any]) -> tuple[dict[str, Any], Copy]:
        """Begin copying `tensors` into this snapshot's buffers; the buffers hold them once `on_host()`.

        The caller must not start another copy before the previous one's writer is done with the buffers.
        """
        import torch

        buffers = self._buffers_for(tensors)
        event = None
        on_cuda = [name for name, tensor in tensors.items() if tensor.is_cuda]
        if on_cuda:
            if self._pinning is not None:  # made after the first step: long done by the first save
                self._pinning.result()
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())  # after the step that made this state
            with torch.cuda.stream(self._stream):
                for name in on_cuda:
                    buffers[name].copy_(tensors[name], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        as_memory = []  # (buffer bytes, tensor bytes) as numpy views, made here: the copier runs numpy alone
        for name, tensor in tensors.items():
            if tensor.device.type == "cpu" and tensor.is_contiguous() and not (tensor.is_conj() or tensor.is_neg()):
                if tensor.numel():
                    as_memory.append((_bytes_of(buffers[name]), _bytes_of(tensor)))
            elif not tensor.is_cuda:
                buffers[name].copy_(tensor)  # rare (a strided or lazily negated view, another device): copied now
        future = self._copier.submit(_copy_memory, as_memory) if as_memory else None
        self._copy = Copy(future, event)
        return buffers, self._copy

    def wait_copied(self) -> None:
        """Hold back what would change the copied tensors until they are copied (the training side).

        On CUDA the current stream waits for the copy's event, which does not block the host.
        """
        copy, self._copy = self._copy, None
        if copy is None:
            return
        if copy._event is not None:
            import torch

            torch.cuda.current_stream().wait_event(copy._event)
        if copy._future is not None:
            copy._future.result()

    def reserve(self, tensors: Mapping[str, Any]) -> Future[None] | None:
        """Make the buffers for `tensors` now, so that the first save does not wait for them (pinning
        gpt2_124m's state blocked its first save on an H100 for 1.6 s); on CUDA, the page-locking that
        goes on in the background. No copy may be running."""
        self._buffers_for(tensors)
        return self._pinning

    def close(self) -> None:
        try:
            self._release()
        finally:
            self._copier.shutdown(wait=True)

    def _buffers_for(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The buffers for `tensors`: the same ones again while the state keeps its layout."""
        layout = tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors.items())
        if layout != self._layout:
            self._release()
            entries = [(name, shape, dtype) for name, shape, dtype, _ in layout]
            self._host = HostMemory(sum(_padded(_nbytes(shape, dtype)) for _, shape, dtype in entries))
            self._buffers, self._layout = self._host.views(entries), layout
            gpu = next((device for *_, device in layout if device.type == "cuda"), None)
            if gpu is not None:
                self._pinning = self._copier.submit(self._host.pin, gpu)
        return dict(self._buffers)

    def _release(self) -> None:
        """Let go of the buffers, once no copy into them can still be running."""
        if self._copy is not None:
            self._copy.on_host()
        if self._pinning is not None:
            self._pinning.result()
            self._copier.submit(self._host.unpin).result()
        self._host, self._pinning, self._buffers, self._layout = None, None, {}, ()


class HostMemory:
    """One host allocation of `size` bytes, starting on a multiple of ALIGNMENT; page-locked for CUDA
    copies by `pin` (exactly `size` bytes: torch's pinned allocator would round it up to a power of two)."""

    def __init__(self, size: int):
        import numpy as np

        raw = np.empty(size + ALIGNMENT, dtype=np.uint8)  # numpy aligns large arrays to 16 bytes only
        start = -raw.ctypes.data % ALIGNMENT
        self.memory = raw[start : start + size]
        self.registered = False

    def views(self, entries: list[tuple[str, tuple[int, ...], Any]]) -> dict[str, Any]:
        """A tensor of each (name, shape, dtype), one after another, each at a multiple of ALIGNMENT.

        Each has a storage of its own over its bytes alone, as a tensor of its own would: torch.save writes
        a view's whole storage, and shared storages read as tied weights.
        """
        import torch

        views, offset = {}, 0
        for name, shape, dtype in entries:
            nbytes = _nbytes(shape, dtype)
            if nbytes:
                views[name] = torch.frombuffer(self.memory[offset : offset + nbytes], dtype=dtype).view(shape)
            else:
                views[name] = torch.empty(shape, dtype=dtype)
            offset += _padded(nbytes)
        return views

    def pin(self, device: Any) -> None:
        """Page-lock the memory for copies from `device` (run on the copy thread). A failure leaves it
        pageable: the snapshot is as correct, but its copy from the GPU blocks training."""
        import torch

        if not self.memory.nbytes:
            return
        try:
            with torch.cuda.device(device):  # this thread's current GPU: no CUDA context is made on another
                status = int(torch.cuda.cudart().cudaHostRegister(self.memory.ctypes.data, self.memory.nbytes, 1))
            problem = None if status == 0 else f"CUDA error {status}"  # flags 1: cudaHostRegisterPortable
        except Exception as exc:  # noqa: BLE001 - pageable memory still does
            problem = repr(exc)
        self.registered = problem is None
        if problem is not None:
            log.warning("could not page-lock %d bytes for background checkpoint saves (%s); "
                        "their copy from the GPU will block training", self.memory.nbytes, problem)  # fmt: skip

    def unpin(self) -> None:
        """Unlock the pages (the memory itself goes with the last tensor over it)."""
        if self.registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.memory.ctypes.data)
            self.registered = False


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return math.prod(shape) * dtype.itemsize


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _copy_memory(pairs: list[tuple[Any, Any]]) -> None:
    """Copy each source array into its destination; numpy's copy releases the GIL and starts no threads."""
    import numpy as np

    for destination, source in pairs:
        np.copyto(destination, source)


def _bytes_of(tensor: Any) -> Any:
    """A contiguous CPU tensor's memory as a flat numpy uint8 array (a view, no copy)."""
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


class Frozen:
    """One object's state as it was at the freeze: `state_dict()` gives it, nothing can load into it."""

    def __init__(self, state_kind: str, state: Any):
        self.state_kind = state_kind
        self._state = state

    def state_dict(self) -> Any:
        return self._state

    def load_state_dict(self, state: Any) -> None:
        raise TypeError("a frozen snapshot is read-only")


class _FrozenConfig:
    def __init__(self, text: str):
        self._text = text

    def to_json_string(self) -> str:
        return self._text


class FrozenModel:
    """The model as the checkpoint writer sees it: `config.to_json_string()` and `state_dict()`."""

    def __init__(self, config_json: str, tensors: dict[str, Any]):
        self.config = _FrozenConfig(config_json)
        self._tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return self._tensors


def state_tensors(model_key: str, model_weights: dict[str, Any], groups: Mapping[str, Mapping[str, Any]]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Every tensor of the state by a name of its own (what a snapshot copies), and how each "tensors"
    object's state is put back together around them: (leaves, tree spec, the name of each tensor leaf)."""
    import torch
    from torch.utils._pytree import tree_flatten

    live: dict[str, Any] = {f"{model_key}/{name}": tensor for name, tensor in model_weights.items()}
    structures = {}
    for key, obj in groups.get("tensors", {}).items():
        state = obj.state_dict()
        leaves, _ = tree_flatten(state)
        slots = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                live[f"{key}/{i}"] = leaf
                slots.append(f"{key}/{i}")
            else:
                slots.append(None)
        structures[key] = (state, leaves, slots)
    return live, structures


IMMUTABLE = (str, bytes, int, float, complex, bool, type(None), Enum)  # kept in a frozen state as the very objects


def _rebuilt(obj: Any, copies: dict[int, Any], memo: dict[int, Any]) -> Any:
    """`obj` (a state_dict) with each tensor replaced by its copy (`copies`, by the live tensor's id).

    Dicts and lists are new (the live ones change as training goes on: a param group's lr); a tuple
    holding no tensor and every scalar and string stay the very objects they are, and an object met
    twice is rebuilt once (`memo`): the frozen state pickles to the same bytes as the live one, whose
    pickle stores a shared object (the `betas` tuple of every param group) once.
    """
    if id(obj) in memo:
        return memo[id(obj)]
    if id(obj) in copies:
        rebuilt = copies[id(obj)]
    elif isinstance(obj, dict):
        rebuilt = copy.copy(obj)  # its type, and a defaultdict's default_factory
        rebuilt.clear()
        memo[id(obj)] = rebuilt  # before its items: a dict that holds itself stays finite
        for name, value in obj.items():
            rebuilt[name] = _rebuilt(value, copies, memo)
        return rebuilt
    elif isinstance(obj, list):
        rebuilt = []
        memo[id(obj)] = rebuilt
        rebuilt.extend(_rebuilt(value, copies, memo) for value in obj)
        return rebuilt
    elif isinstance(obj, tuple):
        items = [_rebuilt(value, copies, memo) for value in obj]
        same = all(a is b for a, b in zip(items, obj, strict=True))
        rebuilt = obj if same else (type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items))
    elif isinstance(obj, IMMUTABLE):
        rebuilt = obj
    else:  # anything else (a set, a deque) is copied whole, tensors and all: nothing live stays in the snapshot
        rebuilt = copy.deepcopy(obj)
    memo[id(obj)] = rebuilt
    return rebuilt


def freeze(model_key: str, model_weights: dict[str, Any], config_json: str, groups: Mapping[str, Mapping[str, Any]],
           snapshot: HostSnapshot) -> tuple[dict[str, Any], Copy]:  # fmt: skip
    """The stateful set frozen at this moment, and the copy of its tensors into `snapshot` (wait for
    it with `Copy.on_host()` before reading them); the rest is copied now.

    `model_weights` are the model's tensors to save (ties already dropped), `groups` the other
    stateful objects by `state_kind` ("tensors" ones may nest their tensors in dicts and lists).
    """
    live, structures = state_tensors(model_key, model_weights, groups)
    buffers, copy = snapshot.start(live)
    frozen: dict[str, Any] = {
        model_key: FrozenModel(config_json, {name: buffers[f"{model_key}/{name}"] for name in model_weights})
    }
    for key, (state, leaves, slots) in structures.items():
        copies = {id(leaf): buffers[slot] for leaf, slot in zip(leaves, slots, strict=True) if slot is not None}
        frozen[key] = Frozen("tensors", _rebuilt(state, copies, {}))
    for key, obj in groups.get("json", {}).items():
        frozen[key] = Frozen("json", json.loads(json.dumps(obj.state_dict())))  # a deep copy, as written
    return frozen, copy
