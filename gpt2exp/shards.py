"""Token shards: document streams -> tokenizer processes -> fixed-size shard files and their manifest.

A cache entry (one folder per corpus, tokenizer and settings) holds:
  tokenizer/                  the HF tokenizer files
  train_000000.bin ...        raw token ids, each document followed by the end-of-text token; every
  val_000000.bin ...          shard holds `shard_tokens` tokens but the last (uint16, uint32 above 65536 ids)
  manifest.json               written last: format, dtype, tokenizer, source, settings; per shard its
                              tokens, sha256 and where it starts (stream, document, token in the document)
  progress.json               while building: the shards done and the lengths of the partial ones
  verified.json               size, mtime and inode of each shard when its checksum last matched

The documents are read in order, in batches; `num_proc` processes tokenize the batches and the
results are written in reading order, so the bytes do not depend on `num_proc`. Memory holds a few
batches per process, whatever the corpus size. A build killed at any point continues from its last
checkpoint (taken at each finished shard and every 30 s); a shard that fails its checksum is built
again from where its manifest says it starts; a full disk removes the partial shards, keeps the
finished ones and says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from gpt2exp.errors import UserError
from gpt2exp.sources import Source, Stream, batches, held_out

log = logging.getLogger(__name__)

FORMAT = 2  # of the manifest and shard layout; another format's cache is refused, not read
CHECKPOINT_EVERY_S = 30.0
SPLITS = ("train", "val")


class DiskFull(UserError):
    """The disk filled while shards were written: the partial ones are gone, the finished ones kept."""


@dataclass(frozen=True, order=True)
class Position:
    """A place in the document streams: token `offset` of document `doc` of stream `stream`."""

    stream: int
    doc: int
    offset: int = 0

    def to_json(self) -> list[int]:
        return [self.stream, self.doc, self.offset]


# -- tokenizing (in worker processes, or here for a corpus of one batch) ----------------------------------

_ENCODER: tuple[Callable[[list[str]], list[list[int]]], int, np.dtype] | None = None


def load_encoder(tokenizer_dir: str, eos: int, dtype: str) -> None:
    """Make `encode` use the tokenizer saved in `tokenizer_dir` (its Rust tokenizer where it has one)."""
    global _ENCODER
    file = Path(tokenizer_dir) / "tokenizer.json"
    if file.exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(file))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        cut = cuts_exactly(tokenizer)

        def ids_of(texts: list[str]) -> list[Any]:
            long = {i for i, text in enumerate(texts) if cut and len(text) > PIECE_CHARS}
            short = [text for i, text in enumerate(texts) if i not in long]
            encoded = iter(tokenizer.encode_batch_fast(short, add_special_tokens=False))
            return [_ids_in_pieces(tokenizer, text) if i in long else next(encoded).ids for i, text in enumerate(texts)]
    else:  # a tokenizer with Python code only (e.g. sentencepiece without tokenizer.json)
        from transformers import AutoTokenizer

        slow = AutoTokenizer.from_pretrained(tokenizer_dir)

        def ids_of(texts: list[str]) -> list[list[int]]:
            return slow(texts, add_special_tokens=False)["input_ids"]

    _ENCODER = (ids_of, eos, np.dtype(dtype))


# A document longer than this is encoded in pieces (where that gives the same ids, `cuts_exactly`):
# the tokenizers library holds about 100 bytes per token of a text it encodes, so a file read as one
# document (data=text_files) would otherwise need about 120 bytes of memory per byte of text.
PIECE_CHARS = 1 << 20
PIECES_PER_CALL = 4  # pieces encoded together (threads share them): ~4 MiB of text in flight
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # after a newline between two characters that are not whitespace


def cuts_exactly(tokenizer: Any) -> bool:
    """Whether a text cut at `_SAFE_CUT` points encodes to the same ids piece by piece as whole: a
    byte-level BPE that splits words with the GPT-2 pattern (its `\\s+` runs, never across such a
    newline) and adds no prefix space to each piece, with no normalizer. GPT-2's tokenizer and
    gpt2exp's own BPE are; anything else (a sentencepiece model, a prefix space) is encoded whole.
    Added tokens are matched before the pattern: one that holds whitespace could span a cut, and one
    that strips the whitespace on its left would take the newline a cut leaves in the piece before."""
    from tokenizers import pre_tokenizers

    pre = tokenizer.pre_tokenizer
    return (
        tokenizer.normalizer is None
        and isinstance(pre, pre_tokenizers.ByteLevel)
        and pre.use_regex
        and not pre.add_prefix_space
        and not any(
            added.lstrip or any(c.isspace() for c in added.content)
            for added in tokenizer.get_added_tokens_decoder().values()
        )
    )


def pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of at least `size` characters, each cut at the first `_SAFE_CUT` past that (a
    text without one is a single piece)."""
    start = 0
    while len(text) - start > size:
        found = _SAFE_CUT.search(text, start + size)
        if found is None:
            break
        yield text[start : found.start()]
        start = found.start()
    yield text[start:]


def _ids_in_pieces(tokenizer: Any, text: str) -> np.ndarray:
    parts: list[np.ndarray] = []
    batch: list[str] = []
    for piece in chain(pieces(text, PIECE_CHARS), [None]):
        if piece is not None:
            batch.append(piece)
        if batch and (piece is None or len(batch) == PIECES_PER_CALL):
            encoded = tokenizer.encode_batch_fast(batch, add_special_tokens=False)
            parts += [np.asarray(e.ids, dtype=np.uint32) for e in encoded]  # each piece's encoding freed here
            batch = []
    return np.concatenate(parts)


def _init_worker(tokenizer_dir: str, eos: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: num_proc processes use num_proc cores
    load_encoder(tokenizer_dir, eos, dtype)


def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The token ids of `texts`, each followed by end-of-text, flat; and each document's token count."""
    ids_of, eos, dtype = _ENCODER
    ids = ids_of(texts)
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    if any(isinstance(row, np.ndarray) for row in ids):  # a long document, encoded in pieces
        flat = np.concatenate([np.asarray(row, dtype=dtype) for row in ids])
    else:
        flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return np.insert(flat, np.cumsum(lengths), dtype.type(eos)), lengths + 1


INLINE_BATCHES = 32  # a corpus of at most this many batches (8 MiB) is tokenized here, in one call


class Tokenizing:
    """Tokenize batches in reading order with `num_proc` processes, at most two batches per process in
    flight. A corpus that ends within INLINE_BATCHES is tokenized here in one call, which the tokenizers
    library spreads over the cores with threads: no process to start (the Shakespeare default)."""

    def __init__(self, tokenizer_dir: Path, eos: int, dtype: np.dtype, num_proc: int):
        self.args, self.num_proc = (str(tokenizer_dir), int(eos), np.dtype(dtype).name), num_proc

    def map(self, items: Iterator[tuple[Any, list[str]]]) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        first = list(islice(items, INLINE_BATCHES))
        if len(first) < INLINE_BATCHES:
            load_encoder(*self.args)
            tokens, lengths = encode([t for _, texts in first for t in texts])
            token_ends, doc = np.concatenate([[0], np.cumsum(lengths)]), 0
            for meta, texts in first:
                yield meta, tokens[token_ends[doc] : token_ends[doc + len(texts)]], lengths[doc : doc + len(texts)]
                doc += len(texts)
            return
        if self.num_proc <= 1:
            load_encoder(*self.args)
            for meta, texts in chain(first, items):
                yield (meta, *encode(texts))
            return
        import multiprocessing

        # fork, as datasets.map does: spawn would import the caller's __main__ again in each process. The
        # processes say so to the tokenizers library, which would otherwise warn that it was forked.
        said = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            pool = multiprocessing.get_context("fork").Pool(self.num_proc, _init_worker, self.args)
        finally:
            if said is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = said
        try:
            pending: deque = deque()
            for meta, texts in chain(first, items):
                pending.append((meta, pool.apply_async(encode, (texts,))))
                if len(pending) >= 2 * self.num_proc:
                    meta, result = pending.popleft()
                    yield (meta, *result.get())
            while pending:
                meta, result = pending.popleft()
                yield (meta, *result.get())
        finally:
            pool.terminate()
            pool.join()


# -- writing one split's shards ---------------------------------------------------------------------------


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class SplitWriter:
    """Appends one split's tokens to its shard files: `shard_tokens` each, published by rename when full."""

    def __init__(
        self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, state: dict[str, Any], single: bool = False
    ):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.single = single  # write one shard only (a rebuild): tokens after it are dropped
        self.shards: list[dict[str, Any]] = list(state["shards"])
        self.start = Position(*state["tmp_start"])
        self.completed = False  # a shard was finished since the last checkpoint
        self.written: list[str] = []  # shards hashed as this process wrote them
        self._open(state["tmp_tokens"])

    @property
    def tmp(self) -> Path:
        return self.folder / (shard_name(self.split, len(self.shards)) + ".tmp")

    def _open(self, keep: int) -> None:
        """Open the partial shard, keeping its first `keep` tokens (hashed again: the hash goes on)."""
        self.hash = hashlib.sha256()
        self.count = keep
        if keep:
            with open(self.tmp, "r+b") as f:
                f.truncate(keep * self.dtype.itemsize)
            with open(self.tmp, "rb") as f:
                while block := f.read(1 << 24):
                    self.hash.update(block)
        self.file = open(self.tmp, "ab" if keep else "wb")  # noqa: SIM115 (closed in _finish / close)

    def write(self, tokens: np.ndarray, position_of: Callable[[int], Position]) -> None:
        """Append `tokens`; `position_of(i)` is where token i of them lies in the streams."""
        done = 0
        while done < len(tokens) and not (self.single and self.completed):
            take = tokens[done : done + self.shard_tokens - self.count]
            data = take.astype(self.dtype, copy=False).tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.count += len(take)
            done += len(take)
            if self.count == self.shard_tokens:
                self._finish()
                if not self.single:
                    self.start = position_of(done)
                    self._open(0)

    def _finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        entry = {
            "file": shard_name(self.split, len(self.shards)),
            "tokens": self.count,
            "sha256": self.hash.hexdigest(),
            "start": self.start.to_json(),
        }
        os.replace(self.tmp, self.folder / entry["file"])
        self.shards.append(entry)
        self.written.append(entry["file"])
        self.completed = True
        self.count = 0  # its tokens are the shard's now

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        """At the end of the streams: the partial shard becomes the last one (none if it is empty)."""
        if self.count:
            self._finish()
        else:
            self.file.close()
            self.tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
            self.tmp.unlink(missing_ok=True)

    def state(self, resume: Position) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "tmp_tokens": self.count,
            "tmp_sha256": self.hash.copy().hexdigest(),
            "tmp_start": self.start.to_json(),
            "resume": resume.to_json(),
        }

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.count


def split_tokens(split: dict[str, Any]) -> int:
    """A split's token count, from its shards: the split's own `tokens` in a cache built by an earlier
    gpt2exp counted the last shard twice."""
    return sum(shard["tokens"] for shard in split["shards"])


# -- the build loop ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a pass over the streams writes: for each split, its writer and the first token it takes."""

    writers: dict[str, SplitWriter]
    resume: dict[str, Position]
    stop: Callable[[], bool] = lambda: False


def _routes(stream: Stream, ids: np.ndarray, fraction: float) -> np.ndarray:
    if stream.route == "holdout":
        return np.where(held_out(ids, fraction), "val", "train")
    return np.full(len(ids), stream.route)


def run(
    streams: list[Stream],
    fraction: float,
    plan: Plan,
    tokenizing: Tokenizing,
    checkpoint: Callable[[Position], None] | None = None,
) -> None:
    """One pass from the earliest resume position of `plan`, writing each split's tokens from its own."""
    begin = min(plan.resume.values())
    progress = _Progress(streams, begin)

    def work() -> Iterator[tuple[Any, list[str]]]:
        for s in range(begin.stream, len(streams)):
            stream = streams[s]
            for first, texts in batches(stream.read, begin.doc if s == begin.stream else 0):
                if plan.stop():
                    return
                ids = np.arange(first, first + len(texts))
                routes = _routes(stream, ids, fraction)
                wanted = np.zeros(len(ids), dtype=bool)
                for split, at in plan.resume.items():
                    if split in plan.writers:
                        wanted |= (routes == split) & ((s > at.stream) | ((s == at.stream) & (ids >= at.doc)))
                chosen = [t for t, w in zip(texts, wanted, strict=True) if w]
                chars = sum(len(t) for t in texts)
                yield (s, ids[wanted], routes[wanted], first + len(texts), len(texts), chars), chosen

    last_checkpoint = time.monotonic()
    for (s, ids, routes, end, count, chars), tokens, lengths in tokenizing.map(work()):
        for split, writer in plan.writers.items():
            mine = routes == split
            if plan.stop() or not mine.any():
                continue
            doc_ids, parts = ids[mine], lengths[mine].copy()
            chunk = tokens[np.repeat(mine, lengths)]
            at = plan.resume[split]
            if at.offset and s == at.stream and doc_ids[0] == at.doc:  # the first document resumes mid-way
                chunk, parts[0] = chunk[at.offset :], parts[0] - at.offset
                plan.resume[split] = Position(at.stream, at.doc)
            writer.write(chunk, _positions(s, doc_ids, parts, lengths[mine]))
        progress.update(count, chars, len(tokens))
        if checkpoint and (any(w.completed for w in plan.writers.values()) or _due(last_checkpoint)):
            checkpoint(Position(s, end))
            last_checkpoint = time.monotonic()
        if plan.stop():
            break
    progress.close()


def _due(since: float) -> bool:
    return time.monotonic() - since >= CHECKPOINT_EVERY_S


def _positions(stream: int, doc_ids: np.ndarray, parts: np.ndarray, lengths: np.ndarray) -> Callable[[int], Position]:
    """Token i of a chunk -> its Position (documents `doc_ids`, `parts[j]` of their tokens in the chunk,
    the last `parts[j]` of `lengths[j]`)."""
    ends = np.cumsum(parts)

    def position_of(i: int) -> Position:
        j = min(int(np.searchsorted(ends, i, side="right")), len(ends) - 1)
        before = int(ends[j - 1]) if j else 0
        return Position(stream, int(doc_ids[j]), int(lengths[j] - parts[j]) + i - before)

    return position_of


class _Progress:
    """documents, tokens, MB/s and ETA (by documents, where the streams say how many), on a terminal."""

    def __init__(self, streams: list[Stream], begin: Position):
        from tqdm import tqdm

        counts = [s.count for s in streams[begin.stream :]]
        total = sum(counts) - begin.doc if all(c is not None for c in counts) else None
        self.bar = tqdm(total=total, unit="doc", desc="tokenizing", dynamic_ncols=True, leave=False, delay=1.0)
        self.chars = self.tokens = 0
        self.started = time.monotonic()

    def update(self, docs: int, chars: int, tokens: int) -> None:
        self.chars, self.tokens = self.chars + chars, self.tokens + tokens
        rate = self.chars / 1e6 / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:.1f} MB/s", refresh=False)
        self.bar.update(docs)

    def close(self) -> None:
        self.bar.close()


# -- a cache entry: build, resume, verify, rebuild -----------------------------------------------------------


def _write_json(path: Path, value: Any) -> None:
    """Replace `path` atomically; on a failure (a full disk) the old file stays and no temporary is left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a finished cache entry, None if it is not finished; another format is refused."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:  # damaged: the entry cannot be trusted
        raise UserError(
            f"the token cache's manifest {path} does not read ({exc}); delete that folder to build it again"
        ) from None
    if not isinstance(manifest, dict):
        raise UserError(f"the token cache's manifest {path} is not a manifest; delete that folder to build it again")
    if manifest.get("format") != FORMAT:
        raise UserError(
            f"the token cache {folder} was written in format {manifest.get('format')} and this gpt2exp reads "
            f"format {FORMAT}; delete that folder to build it again, or set data.cache_dir to another folder"
        )
    return manifest


def build(folder: Path, source: Source, tokenizing: Tokenizing, header: dict[str, Any], shard_tokens: int) -> dict:
    """Tokenize `source` into shards in `folder` (continuing a killed build) and write the manifest."""
    dtype = np.dtype(header["dtype"])
    progress_file = folder / "progress.json"
    saved = json.loads(progress_file.read_text()) if progress_file.exists() else None
    if saved and (saved.get("format") != FORMAT or saved.get("header") != header):
        saved = None  # from another build of this folder: start over
    streams = source.streams()
    writers, resume = {}, {}
    start = {"shards": [], "tmp_tokens": 0, "tmp_sha256": hashlib.sha256().hexdigest(), "tmp_start": [0, 0, 0]}
    for split in SPLITS:
        state = saved["splits"][split] if saved else {**start, "resume": [0, 0, 0]}
        if not _partial_intact(folder, split, dtype, state):
            state = {**state, "tmp_tokens": 0, "resume": state["tmp_start"]}
        writers[split] = SplitWriter(folder, split, dtype, shard_tokens, state)
        resume[split] = Position(*state["resume"])
    if saved:
        done = {s: len(w.shards) for s, w in writers.items()}
        log.info("continuing the token cache %s from %d train and %d val shards", folder, done["train"], done["val"])
    plan = Plan(writers, resume)

    def checkpoint(next_doc: Position) -> None:
        for writer in writers.values():
            writer.sync()
            writer.completed = False
        splits = {s: w.state(max(next_doc, plan.resume[s])) for s, w in writers.items()}
        _write_json(progress_file, {"format": FORMAT, "header": header, "splits": splits})

    try:
        run(streams, source.val_fraction, plan, tokenizing, checkpoint)
        for writer in writers.values():
            writer.close()
        manifest = {**header, "splits": {s: {"tokens": w.tokens, "shards": w.shards} for s, w in writers.items()}}
        _write_json(folder / "manifest.json", manifest)
        # hashed as written: the first load need not read them again (shards of a killed build are read once)
        _write_json(folder / "verified.json", {f: _stamp(folder / f) for w in writers.values() for f in w.written})
    except OSError as exc:
        for writer in writers.values():
            writer.abort()
        if exc.errno != errno.ENOSPC:
            raise
        done = sum(len(w.shards) for w in writers.values())
        (folder / "manifest.json").unlink(missing_ok=True)
        raise DiskFull(
            f"the disk filled while writing the token cache {folder}: the partial shards were removed and the "
            f"{done} finished ones kept; free some space (or set data.cache_dir) and run again to continue"
        ) from None
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    progress_file.unlink(missing_ok=True)
    return manifest


def _partial_intact(folder: Path, split: str, dtype: np.dtype, state: dict[str, Any]) -> bool:
    """Whether the partial shard a checkpoint counted is on disk with those tokens (same sha256)."""
    tmp = folder / (shard_name(split, len(state["shards"])) + ".tmp")
    size = state["tmp_tokens"] * dtype.itemsize
    if not size:
        return True
    if not tmp.exists() or tmp.stat().st_size < size:
        return False
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        left = size
        while left and (block := f.read(min(left, 1 << 24))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest() == state["tmp_sha256"]


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _read_stamps(path: Path) -> dict[str, Any]:
    """verified.json's stamps; none when it is missing or damaged (every shard is then hashed again)."""
    try:
        stamps = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def corrupt_shards(folder: Path, manifest: dict[str, Any]) -> list[tuple[str, int]]:
    """(split, index) of each shard whose sha256 differs from the manifest's. A shard is hashed only if
    it changed (size, mtime or inode) since its checksum last matched: start-up reads no token."""
    stamps_file = folder / "verified.json"
    stamps = _read_stamps(stamps_file)
    bad, changed = [], False
    for split in SPLITS:
        for index, entry in enumerate(manifest["splits"][split]["shards"]):
            path = folder / entry["file"]
            if not path.exists():
                bad.append((split, index))
            elif stamps.get(entry["file"]) != _stamp(path):
                size_ok = path.stat().st_size == entry["tokens"] * np.dtype(manifest["dtype"]).itemsize
                if size_ok and sha256_of(path) == entry["sha256"]:
                    stamps[entry["file"]], changed = _stamp(path), True
                else:
                    bad.append((split, index))
    if changed:
        try:
            _write_json(stamps_file, stamps)
        except OSError as exc:  # a cache this user may only read: the stamps only spare the next start the hashing
            log.warning(
                "could not record the shards' checksums in %s (%s): each start hashes them", folder, exc.strerror
            )
    return bad


def rebuild(folder: Path, source: Source, tokenizing: Tokenizing, manifest: dict, split: str, index: int) -> None:
    """Build shard `index` of `split` again from where the manifest says it starts, and check it."""
    entry = manifest["splits"][split]["shards"][index]
    dtype = np.dtype(manifest["dtype"])
    log.warning("token shard %s failed its checksum: building it again", folder / entry["file"])
    state = {"shards": [None] * index, "tmp_tokens": 0, "tmp_start": entry["start"]}
    writer = SplitWriter(folder, split, dtype, entry["tokens"], state, single=True)
    plan = Plan({split: writer}, {split: Position(*entry["start"])}, stop=lambda: bool(writer.completed))
    try:
        run(source.streams(), source.val_fraction, plan, tokenizing)
        if not writer.completed:
            writer.close()
    except BaseException:
        writer.abort()
        raise
    rebuilt = writer.shards[-1]
    if rebuilt is None or rebuilt["sha256"] != entry["sha256"] or rebuilt["tokens"] != entry["tokens"]:
        (folder / entry["file"]).unlink(missing_ok=True)
        raise UserError(
            f"the documents of {source.description} changed since the token cache {folder} was built "
            f"({entry['file']} came out different); delete that folder to build it again"
        )
    stamps_file = folder / "verified.json"
    stamps = _read_stamps(stamps_file)
    stamps[entry["file"]] = _stamp(folder / entry["file"])
    _write_json(stamps_file, stamps)
