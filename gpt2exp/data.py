"""Corpus -> tokenizer -> verified token shards -> resumable batch sampler; and the `prepare` command.

    python -m gpt2exp.data prepare                                   # the default (Shakespeare)
    python -m gpt2exp.data prepare +experiment=gpt2_124m_fineweb     # FineWeb-Edu, on a CPU node
    python -m gpt2exp.data prepare data=hf_dataset 'data.dataset=/data/owt/*.parquet' data.num_proc=32

`prepare` composes the same config as `python -m gpt2exp.train` (any override is accepted) and
builds the data without training; training builds it on demand otherwise. Documents come from a
source (gpt2exp.sources); a byte-level BPE is trained on the training documents, or an HF tokenizer
is loaded; `data.num_proc` processes tokenize the documents into fixed-size token shards with a
manifest (gpt2exp.shards), in a cache folder keyed by corpus, tokenizer and settings, so a second
run memory-maps them at once. Preparation holds an OS file lock on that entry: of several processes
(the ranks of torchrun, two jobs), one builds and the others wait, then read. The sampler
(gpt2exp.sampler) draws windows from the memory-mapped shards.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2exp.errors import UserError
from gpt2exp.hub import load_pretrained
from gpt2exp.sampler import BatchSampler, TokenShards, val_batches, windows
from gpt2exp.shards import FORMAT, DiskFull, Tokenizing, build, corrupt_shards, read_manifest, rebuild, split_tokens
from gpt2exp.sources import (
    Source,
    batches,
    held_out,
    held_out_count,
    markdown_to_text,
    open_source,
    shakespeare_files,
    split_tail,
    text_file_paths,
)

__all__ = [
    "BatchSampler",
    "TokenData",
    "TokenShards",
    "load_corpus",
    "load_tokenizer",
    "markdown_to_text",
    "prepare_data",
    "shakespeare_files",
    "split_tail",
    "text_file_paths",
    "tokenize",
    "train_bpe",
    "val_batches",
    "validation_texts",
    "windows",
]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
CACHE_FORMAT = FORMAT
BPE_TRAIN_CHARS = 1 << 30  # a BPE is trained on at most the first GiB of training text (all of a small corpus)


# -- 1. the corpus, in memory (small corpora: evaluate's validation text) ------------------------------------


@dataclass
class Corpus:
    train: list[str]
    val: list[str]
    fingerprint: str


def load_corpus(cfg: Any) -> Corpus:
    """Every document of the `data` section, split as prepare_data splits them, in memory."""
    source = open_source(cfg)
    split: dict[str, list[str]] = {"train": [], "val": []}
    for docs in _documents(source):
        for route, text in docs:
            split[route].append(text)
    return Corpus(split["train"], split["val"], source.fingerprint)


def validation_texts(cfg: Any) -> list[str]:
    """The validation documents of the `data` section, split as prepare_data splits them. Training
    documents are read past where held-out ones lie among them, never kept; a training split of its own
    is not read."""
    source = open_source(cfg)
    return [text for docs in _documents(source, skip="train") for route, text in docs if route == "val"]


def _documents(source: Source, skip: str | None = None) -> Iterator[list[tuple[str, str]]]:
    """(split, text) of each document, in reading order, a batch at a time (a stream routed to `skip`
    left unread)."""
    for stream in source.streams():
        if stream.route == skip:
            continue
        for first, texts in batches(stream.read, 0):
            if stream.route == "holdout":
                val = held_out(np.arange(first, first + len(texts)), source.val_fraction)
                yield [("val" if v else "train", t) for v, t in zip(val, texts, strict=True)]
            else:
                yield [(stream.route, t) for t in texts]


def training_texts(source: Source, limit: int = BPE_TRAIN_CHARS) -> Iterator[str]:
    """The training documents in order, up to `limit` characters (the text a BPE is trained on)."""
    seen = 0
    for docs in _documents(source):
        for route, text in docs:
            if route == "train":
                yield text
                seen += len(text)
                if seen >= limit:
                    log.info("the BPE is trained on the first %d characters of the training text", seen)
                    return


# -- 2. the tokenizer ----------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE on `texts` and save it in HF format (AutoTokenizer loads `out_dir`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((line for text in texts for line in text.splitlines(True)), trainer)
    if tokenizer.get_vocab_size() < vocab_size:  # the model's embedding follows the tokenizer, not the setting
        log.warning(
            "the BPE learned %d tokens, fewer than data.tokenizer.vocab_size=%d: the training text holds no more "
            "merges, and the model embeds the tokens learned",
            tokenizer.get_vocab_size(),
            vocab_size,
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )
    wrapped.model_max_length = 1_000_000
    wrapped.save_pretrained(out_dir)


# Files one of which every saved HF tokenizer has (fast, GPT-2 BPE, sentencepiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


def load_tokenizer(path_or_name: str):
    from transformers import AutoTokenizer

    folder = Path(os.path.expanduser(path_or_name))
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"no tokenizer in {path_or_name}: it has none of {', '.join(TOKENIZER_FILES)}; save one there with "
            "tokenizer.save_pretrained(path), or set data.tokenizer.name to a tokenizer's path or hub name (or bpe)"
        )
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path_or_name, what="tokenizer")
    if len(tokenizer) < 2:  # transformers builds an empty GPT-2 tokenizer where the files are missing
        raise UserError(f"the tokenizer of {path_or_name} is empty ({len(tokenizer)} token); its files are missing")
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"tokenizer {path_or_name} has no end-of-text token (eos_token), which ends every document; "
            "pick a GPT-style tokenizer or set its eos_token"
        )
    return tokenizer


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) < 2**16 else np.uint32)


def tokenize(tokenizer, docs: list[str]) -> np.ndarray:
    """Token ids of `docs`, each followed by the end-of-text token, as one flat array: the bytes of a
    split's shards, built in memory (in batches: memory holds the result, not the Python ids)."""
    eos, dtype = tokenizer.eos_token_id, token_dtype(tokenizer)
    parts = [np.zeros(0, dtype=dtype)]
    for i in range(0, len(docs), 256):
        ids = tokenizer(docs[i : i + 256], add_special_tokens=False)["input_ids"]
        parts.extend(np.array([*row, eos], dtype=dtype) for row in ids)
    return np.concatenate(parts)


# -- 3. the token cache ----------------------------------------------------------------------------


def cache_key(cfg: Any, source: Source) -> str:
    """Corpus, tokenizer and every setting that changes the tokens (not num_proc: it changes no byte)."""
    settings = {
        "source": cfg.source,
        "corpus": source.fingerprint,
        "tokenizer": cfg.tokenizer.name,
        "vocab_size": cfg.tokenizer.vocab_size if cfg.tokenizer.name == "bpe" else None,
        "val": [cfg.val_split, cfg.val_fraction, None if cfg.val_split else cfg.holdout],
        "hf": [cfg.config_name, cfg.split, cfg.text_column] if cfg.source == "hf_dataset" else None,
        "shard_tokens": cfg.shard_tokens,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TokenData:
    train: np.ndarray | TokenShards
    val: np.ndarray | TokenShards
    tokenizer: Any
    tokenizer_dir: Path  # HF-format tokenizer files, copied into the run dir and every checkpoint

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def state_context_length(self, n_positions: int) -> None:
        """Make the tokenizer say the model's context length (`model_max_length`), in memory and in its files.

        The cached tokenizer is shared by models of every context length, so the files that go into
        the run dir and every checkpoint are a copy per length (built once, next to the cache's):
        HF pipelines read model_max_length from them.
        """
        self.tokenizer.model_max_length = n_positions
        self.tokenizer_dir = tokenizer_with_context_length(self.tokenizer_dir, n_positions)


def check_token_ids_of_run(tokenizer: Any, tokenizer_dir: Path, recorded: Path | None) -> None:
    """Refuse to go on with a tokenizer that maps tokens to other ids than the run's own (`recorded`,
    its copy in the run dir; None for a new run): a cache built again (by another `tokenizers` version,
    say) would feed the resumed run other token ids than the ones it trained on, silently."""
    if recorded is None or not recorded.is_dir():  # a run recorded before gpt2exp kept its tokenizer
        return
    if load_tokenizer(str(recorded)).get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"the data cache's tokenizer ({tokenizer_dir.parent}) gives other token ids than the "
            f"tokenizer this run trained with ({recorded}): resuming would train on other tokens. The cache was "
            "built again: the training text is not the run's (a data file edited or replaced; a file several "
            "data.files patterns match is now read once), or another tokenizers version built it (run.json names "
            "the run's); restore the run's data or resume with data.cache_dir set to the run's cache, or start a "
            "new run"
        )


def tokenizer_with_context_length(tokenizer_dir: Path, n_positions: int) -> Path:
    """A sibling of `tokenizer_dir` with the same files whose tokenizer_config.json says `n_positions`."""
    out = tokenizer_dir.with_name(f"{tokenizer_dir.name}-ctx{n_positions}")
    if (out / "tokenizer_config.json").exists():
        return out
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        if exc.errno not in READ_ONLY:
            raise
        # a cache this user may only read: the copy is this process's own, in the temp dir, removed at exit
        out = Path(tempfile.mkdtemp(prefix=f"gpt2exp-{out.name}-")) / out.name
        atexit.register(shutil.rmtree, out.parent, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for file in tokenizer_dir.iterdir():  # contents only: a read-only cache's modes stay behind
            if file.is_file():
                shutil.copyfile(file, staging / file.name)
        config_file = staging / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        config["model_max_length"] = n_positions
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        publish(staging, out, "tokenizer_config.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def publish(staging: Path, final: Path, marker: str) -> None:
    """Rename a finished `staging` dir to `final`; another process that got there first (its `marker`
    file is in place) is no error: its copy of the same content stays."""
    try:
        staging.rename(final)
    except OSError:
        if not (final / marker).exists():
            raise


READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)  # a cache this user may read but not write


@contextlib.contextmanager
def cache_lock(lock_file: Path) -> Iterator[None]:
    """An OS file lock (released when its process dies): one process prepares an entry, others wait.

    A process whose bad input left nothing built removes the lock file it made (prepare_data): one that
    waited on it then holds a lock on a removed file, so it takes the lock again on the file now at
    that path. In a cache this user may only read (prepared once, shared), a shared lock is taken on
    the lock file opened for reading, or none where it was never made."""
    while True:
        mode = fcntl.LOCK_EX
        try:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_file, "a")  # noqa: SIM115 (closed below)
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                raise
            if not lock_file.exists():
                yield
                return
            handle = open(lock_file)  # noqa: SIM115 (closed below)
            mode = fcntl.LOCK_SH  # a reader: it waits for a builder, and NFS refuses LOCK_EX on a read-only file
        with handle:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process that prepares the same token cache (%s)", lock_file)
                fcntl.flock(handle, mode)
            if _same_file(handle, lock_file):
                yield
                return


def _same_file(handle: Any, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_data(cfg: Any, tokenizer_of_run: Path | None = None) -> TokenData:
    """The token shards and tokenizer for `cfg` (the `data` section), built once, checked at every call.

    `tokenizer_of_run`: a resumed run's own tokenizer (its copy in the run dir), which the cache's must
    equal in token ids; a new entry is compared before its text is tokenized (hours on a large corpus).
    """
    source = open_source(cfg)
    root = Path(os.path.expanduser(cfg.cache_dir))
    folder = root / f"{cfg.source}-{cache_key(cfg, source)}"
    lock_file = root / f".{folder.name}.lock"
    new_root, new_lock = not root.exists(), not lock_file.exists()
    try:
        with cache_lock(lock_file):
            try:
                manifest = read_manifest(folder)
                if manifest is None and source.unsound_split:
                    raise UserError(source.unsound_split)
                if manifest is None:
                    manifest = _build_entry(cfg, source, folder, tokenizer_of_run)
                elif source.unsound_split:  # a run that started so goes on as it began
                    log.warning(
                        "%s (the token cache %s was built so; it is used as it is)", source.unsound_split, folder
                    )
                bad = corrupt_shards(folder, manifest)
                if bad:
                    tokenizing = _tokenizing(cfg, folder, manifest)
                    for split, index in bad:
                        rebuild(folder, source, tokenizing, manifest, split, index)
            except UserError as exc:  # bad input: the lock file this start made goes, while it is still held
                if new_lock and not isinstance(exc, DiskFull) and not folder.exists():
                    lock_file.unlink(missing_ok=True)  # a waiter then takes the lock on the file at its path
                raise
    except OSError as exc:
        if isinstance(exc, UserError) or exc.errno not in READ_ONLY:
            raise
        missing = "has a corrupt shard" if folder.exists() else "is not built"
        raise UserError(
            f"the token cache {folder} {missing} and cannot be written there ({exc.strerror}); set data.cache_dir "
            "to a dir you can write in, or prepare it where the cache is writable (python -m gpt2exp.data prepare)"
        ) from None
    except UserError as exc:
        if new_root and not isinstance(exc, DiskFull) and not folder.exists():  # bad input: take back the root
            with contextlib.suppress(OSError):  # unless another process made an entry there meanwhile
                root.rmdir()
        raise
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    check_token_ids_of_run(tokenizer, folder / "tokenizer", tokenizer_of_run)
    return TokenData(
        _open_split(folder, manifest, "train"), _open_split(folder, manifest, "val"), tokenizer, folder / "tokenizer"
    )


def _tokenizing(cfg: Any, folder: Path, manifest: dict[str, Any]) -> Tokenizing:
    num_proc = cfg.num_proc or default_num_proc()
    return Tokenizing(folder / "tokenizer", manifest["eos_id"], np.dtype(manifest["dtype"]), num_proc)


def _open_split(folder: Path, manifest: dict[str, Any], split: str) -> np.ndarray | TokenShards:
    dtype, shards = np.dtype(manifest["dtype"]), manifest["splits"][split]["shards"]
    if not shards:
        return np.zeros(0, dtype=dtype)
    if len(shards) == 1:
        return np.memmap(folder / shards[0]["file"], dtype=dtype, mode="r")
    return TokenShards([folder / s["file"] for s in shards], dtype)


def _build_entry(cfg: Any, source: Source, folder: Path, tokenizer_of_run: Path | None) -> dict[str, Any]:
    """Tokenizer and shards of a new (or half-built) cache entry. Bad input removes what it started."""
    tokenizer = None if cfg.tokenizer.name == "bpe" else load_tokenizer(cfg.tokenizer.name)  # refused before any write
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _check_split_sizes(cfg, source)
        tokenizer_dir = folder / "tokenizer"
        if not (tokenizer_dir / "tokenizer_config.json").exists():
            staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=folder))
            try:
                if tokenizer is None:
                    log.info("training a byte-level BPE (vocab %d) on the training text", cfg.tokenizer.vocab_size)
                    train_bpe(training_texts(source), cfg.tokenizer.vocab_size, staging)
                else:
                    tokenizer.save_pretrained(staging)
                publish(staging, tokenizer_dir, "tokenizer_config.json")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        tokenizer = load_tokenizer(str(tokenizer_dir))
        check_token_ids_of_run(tokenizer, tokenizer_dir, tokenizer_of_run)
        header = {
            "format": FORMAT,
            "dtype": token_dtype(tokenizer).name,
            "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id,
            "tokenizer": cfg.tokenizer.name,
            "source": {"kind": cfg.source, "description": source.description, "fingerprint": source.fingerprint},
            "settings": {
                "val_split": cfg.val_split,
                "val_fraction": cfg.val_fraction,
                "holdout": cfg.holdout,
                "shard_tokens": cfg.shard_tokens,
                "text_column": cfg.text_column,
            },
        }
        num_proc = cfg.num_proc or default_num_proc()
        log.info("tokenizing %s into %s with %d processes", source.description, folder, num_proc)
        tokenizing = Tokenizing(tokenizer_dir, header["eos_id"], np.dtype(header["dtype"]), num_proc)
        manifest = build(folder, source, tokenizing, header, cfg.shard_tokens)
        _check_split_tokens(cfg, source, manifest)
    except DiskFull:
        raise
    except UserError:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        else:  # a killed build's entry, finished here and refused: its manifest must not make it a cache
            (folder / "manifest.json").unlink(missing_ok=True)
        raise
    except BaseException:
        (folder / "manifest.json").unlink(missing_ok=True)
        raise
    train, val = (split_tokens(manifest["splits"][s]) for s in ("train", "val"))
    log.info("token cache %s: %d train and %d val tokens", folder, train, val)
    return manifest


def _too_small(cfg: Any, source: Source, count: int, held: int) -> UserError:
    need = int(np.ceil(0.5 / cfg.val_fraction))
    return UserError(
        f"{source.description} holds {count} documents: too few to hold out data.val_fraction={cfg.val_fraction:g} "
        f"of them for validation ({held} would be) and keep training text; it needs at least {need} documents, "
        "or a larger data.val_fraction, or a named validation set (data.val_split)"
    )


def _check_split_sizes(cfg: Any, source: Source) -> None:
    """Before tokenizing, where the document count is known: a split that would be empty."""
    for stream in source.streams():
        if stream.route == "holdout" and stream.count is not None:
            held = held_out_count(stream.count, cfg.val_fraction)
            if stream.count == 0:
                raise UserError(f"{source.description} holds no documents; check data.dataset / data.files")
            if held == 0 or held == stream.count:
                raise _too_small(cfg, source, stream.count, held)


def _check_split_tokens(cfg: Any, source: Source, manifest: dict[str, Any]) -> None:
    train, val = (split_tokens(manifest["splits"][s]) for s in ("train", "val"))
    if train == 0 and val == 0:
        raise UserError(f"{source.description} holds no documents; check data.dataset / data.files")
    if train == 0:
        raise UserError("the training text is empty; check data.files / data.dataset")
    if val == 0 and not cfg.val_split and cfg.holdout == "documents" and source.streams()[0].route == "holdout":
        raise UserError(
            f"{source.description} is too small to hold out data.val_fraction={cfg.val_fraction:g} of its "
            "documents for validation; add documents, raise data.val_fraction, or name a validation set"
        )


# -- 4. the command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from gpt2exp.composing import compose
    from gpt2exp.config import CONF_DIR
    from gpt2exp.errors import fail

    parser = argparse.ArgumentParser(
        prog="python -m gpt2exp.data", description="Prepare the token shards of a data config without training."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare", help="tokenize the data the composed config names into its cache (resumable)"
    )
    prepare.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="as on the train command line, e.g. data=hf_dataset"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if any(arg.split("=", 1)[0].lstrip("+~") == "resume" for arg in args.overrides):
            raise UserError(
                "prepare composes the data config its overrides give and resumes no run; drop resume=, and pass "
                "the run's data.* settings (its config.yaml) to prepare that data"
            )
        cfg = compose(CONF_DIR, args.overrides)
        data = prepare_data(cfg.data)
    except UserError as exc:
        fail(str(exc))
    folder = data.tokenizer_dir.parent
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"token cache  {folder}")
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        count = len(entry["shards"])
        print(f"{split:<12} {split_tokens(entry):,} tokens in {count} shard{'s' if count != 1 else ''}")
    print(f"tokenizer    {cfg.data.tokenizer.name} (vocab {data.vocab_size}, {manifest['dtype']})")


if __name__ == "__main__":
    main()
