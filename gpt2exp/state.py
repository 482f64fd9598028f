"""The stateful protocol, and the small stateful objects the checkpoint saves beside the model.

Every object with state that must survive a restart exposes `state_dict()` / `load_state_dict()`
and a class attribute `state_kind` saying where its state goes: "json" (JSON-able values, to
trainer_state.json) or "tensors" (to optimizer.pt, loaded back with torch.load(weights_only=True)).
Torch objects that cannot carry the attribute are wrapped in `TensorState`. Heavy imports (numpy,
torch) happen inside functions: checkpoint.py imports this module, and the CLIs import that one.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Protocol

StateKind = Literal["json", "tensors"]
STATE_KINDS: tuple[StateKind, ...] = ("json", "tensors")


class Stateful(Protocol):
    state_kind: ClassVar[StateKind]

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorState:
    """A torch object (optimizer, grad scaler) declared as tensor state; everything else is delegated."""

    state_kind: ClassVar[StateKind] = "tensors"

    def __init__(self, obj: Any):
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(state)


def group_by_kind(objects: Mapping[str, Any]) -> dict[StateKind, dict[str, Stateful]]:
    """`objects` split by their `state_kind`, None entries left out; an undeclared kind is a TypeError."""
    groups: dict[StateKind, dict[str, Stateful]] = {kind: {} for kind in STATE_KINDS}
    for key, obj in objects.items():
        if obj is None:
            continue
        kind = getattr(obj, "state_kind", None)
        if kind not in STATE_KINDS:
            raise TypeError(
                f"stateful entry {key!r} ({type(obj).__name__}) declares state_kind={kind!r}, not one of "
                f"{STATE_KINDS}; wrap torch objects in TensorState"
            )
        groups[kind][key] = obj
    return groups


@dataclass
class TrainerCounters:
    """Progress of the run: optimizer steps done, tokens seen, the newest evaluation, the W&B run, and
    early stopping's count (the best val/loss so far and the evaluations in a row that did not improve
    on it). A checkpoint from before the early-stopping fields loads with their defaults."""

    state_kind: ClassVar[StateKind] = "json"
    # saved by checkpoints written before every saved field had to be restored; read and dropped
    LEGACY_KEYS: ClassVar[frozenset[str]] = frozenset({"best_metric", "last_logged_step"})

    step: int = 0
    tokens_seen: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)  # newest val metrics and their step
    wandb_id: str | None = None
    best_val_loss: float | None = None  # the lowest finite val/loss evaluated so far
    evals_without_improvement: int = 0  # evaluations in a row not below best_val_loss by min_delta

    def record_eval(self, val_loss: float, min_delta: float) -> None:
        """Count an evaluation for early stopping: an improvement is a finite val/loss below the best
        so far by more than `min_delta` (the first finite one always is); anything else adds one."""
        best = self.best_val_loss
        if math.isfinite(val_loss) and (best is None or val_loss < best - min_delta):
            self.best_val_loss, self.evals_without_improvement = val_loss, 0
        else:
            self.evals_without_improvement += 1

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - set(asdict(self)) - self.LEGACY_KEYS
        if unknown:
            raise ValueError(f"trainer counters have no field {sorted(unknown)}; the checkpoint is from other code")
        for key, value in state.items():
            if key not in self.LEGACY_KEYS:
                setattr(self, key, value)


class RngState:
    """The python, numpy, torch CPU and CUDA generators, captured and restored together."""

    state_kind: ClassVar[StateKind] = "json"

    def state_dict(self) -> dict[str, Any]:
        import numpy as np
        import torch

        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import numpy as np
        import torch

        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])

    def load_forked(self, state: dict[str, Any], rank: int) -> None:
        """For a rank that has no state of its own (a run resumed on more processes than saved it):
        every generator seeded from `state` and `rank` together, so no two ranks draw the same dropout
        masks and a second resume from the same checkpoint draws what the first did."""
        import hashlib

        digest = hashlib.sha256(json.dumps([state, rank]).encode()).digest()
        seed_everything(int.from_bytes(digest[:8], "little") % 2**63)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def process_state_restored() -> Iterator[None]:
    """Leave the process as the job found it, for the next job of a sweep in the same process.

    Hydra's basic launcher runs a sweep's jobs one after another in one process, and joblib reuses
    its workers: the torch thread count, the TF32 switches and the global RNGs a job sets must not
    leak into the next one, and the job's datasets (memory-maps) are released.
    """
    import gc

    import torch

    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    rng = RngState().state_dict()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        RngState().load_state_dict(rng)
        gc.collect()
