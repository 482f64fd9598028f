"""Small stateful objects the checkpoint saves beside the model and optimizer.

Each exposes state_dict()/load_state_dict() with JSON-able values, like every other piece of state
that must survive a restart.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class TrainerCounters:
    """Progress of the run: optimizer steps done, tokens seen, the best metric so far."""

    step: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)  # newest val metrics and their step
    wandb_id: str | None = None
    last_logged_step: int = 0  # W&B and metrics.jsonl rows after the checkpoint step are replaced on resume

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class RngState:
    """The python, numpy, torch CPU and CUDA generators, captured and restored together."""

    def state_dict(self) -> dict[str, Any]:
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
        import torch

        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def process_state_restored() -> Iterator[None]:
    """Leave the process as the job found it, for the next job of a sweep in the same process.

    Hydra's basic launcher runs a sweep's jobs one after another in one process, and joblib reuses
    its workers: the torch thread count and the global RNGs a job sets must not leak into the
    next one, and the job's datasets (memory-maps) are released.
    """
    import gc

    import torch

    threads = torch.get_num_threads()
    rng = RngState().state_dict()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        RngState().load_state_dict(rng)
        gc.collect()
