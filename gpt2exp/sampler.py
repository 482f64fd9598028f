"""Batches of token windows: the training sampler (random, resumable) and the fixed validation windows.

The tokens are one stream: a flat array, or `TokenShards`, the memory-mapped shard files of a split read
as their concatenation. A window may cross a shard boundary, so the windows of a stream are the same
however it is sharded (one array or many shards give the same batches).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpt2exp.errors import UserError


class TokenShards:
    """Shard files of one split, memory-mapped, indexed as one flat array (only what is read is loaded)."""

    def __init__(self, paths: Sequence[Path], dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.shards = [np.memmap(p, dtype=self.dtype, mode="r") for p in paths]
        sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(sizes)])  # shard i holds [bounds[i], bounds[i+1])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as an array (a view when they lie in one shard)."""
        if start >= stop:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - int(self.bounds[first])
            take = min(stop - start, len(self.shards[first]) - offset)
            pieces.append(self.shards[first][offset : offset + take])
            start += take
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, index):
        if isinstance(index, slice):  # what a numpy array gives, negative steps included
            picked = range(*index.indices(len(self)))
            if not picked:
                return np.zeros(0, self.dtype)
            low, high = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
            return (
                self.read(low, high)[:: picked.step] if picked.step > 0 else self.read(low, high)[::-1][:: -picked.step]
            )
        if isinstance(index, int | np.integer):
            index = int(index) + (len(self) if index < 0 else 0)
            return self.read(index, index + 1)[0]
        raise TypeError("TokenShards takes an int or a slice; use windows() for many windows")

    def __array__(self, dtype=None, copy=None):
        flat = self.read(0, len(self)) if len(self) else np.zeros(0, self.dtype)
        return np.asarray(flat, dtype=dtype)

    def max(self) -> int:
        return max((int(s.max()) for s in self.shards if len(s)), default=0)


Tokens = np.ndarray | TokenShards

SAMPLED_SPANS, SPAN_TOKENS = 256, 256  # what a data position's content digest reads: 64K tokens, wherever they lie


def sampled_digest(tokens: Tokens) -> str:
    """A digest of the token ids in SAMPLED_SPANS evenly spaced spans (of any dtype, any sharding):
    other data is told from the run's own without reading all of it (FineWeb: billions of tokens)."""
    digest = hashlib.sha256()
    span = min(SPAN_TOKENS, len(tokens))
    for start in np.linspace(0, len(tokens) - span, num=SAMPLED_SPANS).astype(np.int64):
        digest.update(np.asarray(tokens[int(start) : int(start) + span], dtype="<i8").tobytes())
    return digest.hexdigest()[:16]


def windows(tokens: Tokens, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets (int64) for windows beginning at `starts`."""
    if isinstance(tokens, TokenShards):
        chunk = np.stack([tokens.read(int(s), int(s) + block_size + 1) for s in starts]).astype(np.int64)
    else:
        index = starts[:, None] + np.arange(block_size + 1)[None, :]
        chunk = tokens[index].astype(np.int64)
    return chunk[:, :-1], chunk[:, 1:]


class BatchSampler:
    """Random non-overlapping windows, one epoch at a time, resumable to the exact batch.

    Each epoch's order and window offset are a pure function of (seed, epoch), so the whole
    position is `{seed, epoch, offset}` and restoring it consumes no randomness. The order takes 4
    bytes per window (8 above 2**32 windows); nothing else grows with the number of tokens. Every
    rank of a distributed run can draw the whole global batch: it is the same on every rank.
    """

    state_kind = "json"

    def __init__(self, tokens: Tokens, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.num_windows = (len(tokens) - block_size) // block_size
        if self.num_windows < batch_size:
            raise UserError(
                f"the training data holds {len(tokens)} tokens, too few for trainer.batch_size={batch_size} "
                f"windows of model.block_size={block_size}; use more text or smaller settings"
            )
        self.seed, self.epoch, self.offset = seed, 0, 0
        self._order_epoch: int | None = None
        self._digest: str | None = None  # sampled_digest(tokens), read at the first save or resume

    def _starts(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            shift = int(rng.integers(self.block_size))
            # rng.shuffle of an arange draws what rng.permutation(n) draws: the same order in half the memory
            order = np.arange(self.num_windows, dtype=np.uint32 if self.num_windows < 2**32 else np.int64)
            rng.shuffle(order)
            self._order, self._shift = order, shift
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        starts: list[np.ndarray] = []
        needed = self.batch_size
        while needed:
            order = self._starts()
            take = order[self.offset : self.offset + needed].astype(np.int64) * self.block_size + self._shift
            starts.append(take)
            needed -= len(take)
            self.offset += len(take)
            if self.offset == self.num_windows:
                self.epoch, self.offset = self.epoch + 1, 0
        return windows(self.tokens, np.concatenate(starts), self.block_size)

    def state_dict(self) -> dict[str, int | str]:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset, **self.data_identity()}

    def data_identity(self) -> dict[str, int | str]:
        """What the position is a position in, saved beside it and compared on resume (not restored)."""
        if self._digest is None:
            self._digest = sampled_digest(self.tokens)
        return {"windows": self.num_windows, "tokens": len(self.tokens), "digest": self._digest}

    def check_state_dict(self, state: dict[str, int | str]) -> None:
        """Refuse a saved position in other data: the resumed run would train on other batches, or none
        at all (an offset past the windows there are). A checkpoint reader calls it before it restores
        anything. Checkpoints before a field was saved have none of it."""
        own = self.data_identity()
        saved = {key: state[key] for key in own if key in state}
        if saved.get("windows", own["windows"]) != own["windows"]:
            differ = f"one in {saved['windows']} training windows, and this run's data holds {own['windows']}"
        elif saved != {key: own[key] for key in saved}:
            differ = (
                f"one in {saved.get('tokens', '?')} training tokens with digest {saved.get('digest', '?')}, and this "
                f"run's data is {own['tokens']} tokens with digest {own['digest']}"
            )
        else:
            return
        raise UserError(
            f"the checkpoint's data position is {differ}: the data changed since the run started; resume with "
            "the data it trained on (the same files, dataset revision and data.cache_dir)"
        )

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.check_state_dict(state)
        self.seed, self.epoch, self.offset = int(state["seed"]), int(state["epoch"]), int(state["offset"])
        self._order_epoch = None  # the cached order belonged to the old position


def val_batches(tokens: Tokens, block_size: int, batch_size: int, num_batches: int):
    """A fixed set of evenly spaced validation windows: the same every evaluation, no randomness."""
    if len(tokens) < block_size + 2:
        raise UserError(
            f"the validation data holds {len(tokens)} tokens, fewer than model.block_size={block_size}; "
            "raise data.val_fraction or lower model.block_size"
        )
    count = batch_size * num_batches
    starts = np.linspace(0, len(tokens) - block_size - 1, num=count).astype(np.int64)
    return [windows(tokens, starts[i : i + batch_size], block_size) for i in range(0, count, batch_size)]
