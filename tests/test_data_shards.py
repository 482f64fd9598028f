"""Data at scale: sources, token shards (parallel, resumable, verified), held-out documents, the shard sampler.

Everything runs on small corpora generated here, with a GPT-2-style (byte-level BPE) tokenizer saved
locally: nothing downloads.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from gpt2exp import data, shards, sources
from gpt2exp.config import CONF_DIR, DataConfig
from gpt2exp.errors import UserError
from gpt2exp.sampler import sampled_digest

DATA_FILES_SOURCE = sources.data_files_source

WORDS = (
    "the of and to in is was for that with as his on be at by it from had he not are but or this an which you".split()
)


def documents(count: int, seed: int = 0) -> list[str]:
    """`count` documents of 5-400 words, some with newlines and non-ASCII text."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        words = rng.choice(WORDS, size=int(rng.integers(5, 400)))
        text = " ".join(words)
        if i % 3 == 0:
            text = text.replace(" is ", " is\n")
        docs.append(f"Document {i}: {text} — café {i}.")
    return docs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A GPT-2-style tokenizer (byte-level BPE, <|endoftext|>) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tok") / "gpt2-style"
    data.train_bpe(documents(300, seed=9), 400, folder)
    return folder


def write_parquet(docs: list[str], folder: Path, per_file: int = 150, column: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(range(0, len(docs), per_file)):
        table = pa.table({"id": list(range(i, i + len(docs[i : i + per_file]))), column: docs[i : i + per_file]})
        pq.write_table(table, folder / f"part-{n:03d}.parquet", row_group_size=40)
    return folder


def data_cfg(tmp_path: Path, tokenizer: Path | str, dataset: str, **overrides):
    option = OmegaConf.load(f"{CONF_DIR}/data/hf_dataset.yaml")
    mine = {
        "dataset": dataset,
        "cache_dir": str(tmp_path / "cache"),
        "tokenizer": {"name": str(tokenizer)},
        "shard_tokens": 3000,
        "num_proc": 1,
    }
    return OmegaConf.merge(OmegaConf.structured(DataConfig), option, mine, overrides)


def entry_of(prepared: data.TokenData) -> Path:
    return prepared.tokenizer_dir.parent


def shard_files(folder: Path) -> dict[str, str]:
    """sha256 of every shard file and the manifest's shard list."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.bin"))}
    files["manifest"] = json.dumps(json.loads((folder / "manifest.json").read_text())["splits"], sort_keys=True)
    return files


def expected_tokens(tokenizer_dir: Path, docs: list[str]) -> np.ndarray:
    tokenizer = data.load_tokenizer(str(tokenizer_dir))
    return data.tokenize(tokenizer, docs)


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Batches of 8 documents (about 2,500 tokens): a 600-document corpus makes many checkpoints."""
    monkeypatch.setattr(sources, "BATCH_DOCS", 8)


# -- shards ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_parquet(documents(600), tmp_path_factory.mktemp("corpus") / "parquet")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir, corpus) -> Path:
    """The corpus prepared once with one process: the reference bytes."""
    tmp = tmp_path_factory.mktemp("built")
    return entry_of(data.prepare_data(data_cfg(tmp, tokenizer_dir, str(corpus / "*.parquet"))))


def test_shards_hold_each_document_then_end_of_text_in_fixed_sizes(built, tokenizer_dir):
    docs = documents(600)
    val = sources.held_out(np.arange(600), 0.05)
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format"] == shards.FORMAT and manifest["dtype"] == "uint16"
    train = np.concatenate([np.fromfile(built / s["file"], np.uint16) for s in manifest["splits"]["train"]["shards"]])
    val_tokens = np.concatenate(
        [np.fromfile(built / s["file"], np.uint16) for s in manifest["splits"]["val"]["shards"]]
    )
    assert np.array_equal(train, expected_tokens(tokenizer_dir, [d for d, v in zip(docs, val, strict=True) if not v]))
    assert np.array_equal(val_tokens, expected_tokens(tokenizer_dir, [d for d, v in zip(docs, val, strict=True) if v]))
    sizes = [s["tokens"] for s in manifest["splits"]["train"]["shards"]]
    assert len(sizes) > 3 and set(sizes[:-1]) == {3000} and 0 < sizes[-1] <= 3000
    # each split's total is its tokens on disk: the last, partial shard counted once
    assert (manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]) == (len(train), len(val_tokens))
    for entry in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        assert hashlib.sha256((built / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]


TRICKY = (
    "ROMEO:\nBut soft!  what light\n\n\tthrough yonder window breaks? \nIt is the east,\r\n"
    "and Juliet   is the sun.\n 42 \u00e9t\u00e9 \u3000\u2028done;\n\n\nArise, fair sun\n'tis\n"
)


def test_a_long_document_is_encoded_in_pieces_to_the_same_ids_as_whole(tokenizer_dir, monkeypatch):
    """Every kind of whitespace around the cuts; each cut lies after a newline between two non-space characters."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = TRICKY * 300
    cut = list(shards.pieces(text, 50))
    assert "".join(cut) == text and len(cut) > 100
    assert all(a[-1] == "\n" and not a[-2].isspace() and not b[0].isspace() for a, b in itertools.pairwise(cut))
    assert shards.cuts_exactly(tokenizer)
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(shards, "PIECE_CHARS", 50)
    assert shards._ids_in_pieces(tokenizer, text).tolist() == whole
    shards.load_encoder(str(tokenizer_dir), 0, "uint16")
    tokens, lengths = shards.encode(["short one", text, "another"])  # a long document among short ones
    short, other = (tokenizer.encode(t, add_special_tokens=False).ids for t in ("short one", "another"))
    assert tokens.tolist() == [*short, 0, *whole, 0, *other, 0]
    assert lengths.tolist() == [len(short) + 1, len(whole) + 1, len(other) + 1]


def test_a_tokenizer_that_a_cut_would_change_encodes_a_long_document_whole(tokenizer_dir, monkeypatch):
    """A prefix space before each piece, or a normalizer, would change the ids at every cut."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    with_prefix = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    with_prefix.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    normalized = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    normalized.normalizer = normalizers.NFKC()
    assert not shards.cuts_exactly(with_prefix) and not shards.cuts_exactly(normalized)
    text = TRICKY * 20
    monkeypatch.setattr(shards, "PIECE_CHARS", 50)
    assert shards._ids_in_pieces(with_prefix, text).tolist() != with_prefix.encode(text).ids  # why it is refused
    folder = tokenizer_dir.parent / "with-prefix"
    folder.mkdir(exist_ok=True)
    with_prefix.save(str(folder / "tokenizer.json"))
    shards.load_encoder(str(folder), 0, "uint16")
    assert shards.encode([text])[0].tolist() == [*with_prefix.encode(text).ids, 0]


@pytest.mark.parametrize("added", [{"content": "'tis", "lstrip": True}, {"content": "sun\n'tis"}])
def test_an_added_token_that_could_span_or_strip_a_cut_encodes_a_long_document_whole(tokenizer_dir, monkeypatch, added):
    """Added tokens are matched before the pattern: whitespace inside one could fall across a cut, and
    stripping on the left takes the newline a cut leaves in the piece before it."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert shards.cuts_exactly(tokenizer)  # <|endoftext|> neither holds nor strips whitespace
    tokenizer.add_tokens([AddedToken(**added)])
    assert not shards.cuts_exactly(tokenizer)
    text = TRICKY * 20
    monkeypatch.setattr(shards, "PIECE_CHARS", 50)
    assert shards._ids_in_pieces(tokenizer, text).tolist() != tokenizer.encode(text).ids  # why it is refused


def test_an_added_token_that_strips_on_its_right_only_keeps_the_cut(tokenizer_dir, monkeypatch):
    """A cut lies after a newline with a non-space character before it: the newline is in that piece."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken("sun", rstrip=True)])
    assert shards.cuts_exactly(tokenizer)
    text = TRICKY * 20
    assert sum(piece.endswith("sun\n") for piece in shards.pieces(text, 50)) > 5  # "fair sun\n'tis" is cut
    monkeypatch.setattr(shards, "PIECE_CHARS", 50)
    assert shards._ids_in_pieces(tokenizer, text).tolist() == tokenizer.encode(text, add_special_tokens=False).ids


def test_two_processes_write_the_same_bytes_as_one(tmp_path, built, tokenizer_dir, corpus):
    two = entry_of(data.prepare_data(data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"), num_proc=2)))
    assert two.name == built.name  # num_proc is not part of the cache key: it changes no byte
    assert shard_files(two) == shard_files(built)


def test_a_killed_preparation_continues_from_its_checkpoint_to_the_same_bytes(
    tmp_path, built, tokenizer_dir, corpus, monkeypatch
):
    """The folder as a kill leaves it just after the third checkpoint (a partial shard with more tokens
    than the checkpoint counted), then a second call: the same bytes as one uninterrupted build."""
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"))
    folder = tmp_path / "cache" / built.name
    snapshot = tmp_path / "snapshot"
    checkpoints = []
    write_json = shards._write_json

    def kept_at_the_third_checkpoint(path, value):
        write_json(path, value)
        if path.name == "progress.json":
            checkpoints.append(json.loads(json.dumps(value)))  # as written, not the live lists
            if len(checkpoints) == 3:
                shutil.copytree(folder, snapshot)

    monkeypatch.setattr(shards, "_write_json", kept_at_the_third_checkpoint)
    data.prepare_data(cfg)
    monkeypatch.undo()
    shutil.rmtree(folder)
    shutil.copytree(snapshot, folder)
    done = checkpoints[2]["splits"]["train"]
    assert not (folder / "manifest.json").exists() and 3 <= len(done["shards"]) < 10 and done["tmp_tokens"]
    partial = folder / f"train_{len(done['shards']):06d}.bin.tmp"
    with open(partial, "ab") as f:
        f.write(b"\x07\x00" * 50)  # tokens written after the checkpoint: dropped on resume

    tokenized = []
    encode = shards.encode
    monkeypatch.setattr(shards, "encode", lambda texts: tokenized.append(len(texts)) or encode(texts))
    data.prepare_data(cfg)
    assert shard_files(folder) == shard_files(built)
    assert 0 < sum(tokenized) < 600  # only the documents after the checkpoint were tokenized again
    assert not (folder / "progress.json").exists() and not list(folder.glob("*.tmp"))


def test_a_partial_shard_that_does_not_match_its_checkpoint_is_built_again(tmp_path, built, tokenizer_dir, corpus):
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"))
    folder = tmp_path / "cache" / built.name
    folder.mkdir(parents=True)
    shutil.copytree(built / "tokenizer", folder / "tokenizer")
    manifest = json.loads((built / "manifest.json").read_text())
    header = {k: v for k, v in manifest.items() if k != "splits"}
    train = manifest["splits"]["train"]["shards"]
    shutil.copy(built / train[0]["file"], folder / train[0]["file"])
    (folder / "train_000001.bin.tmp").write_bytes(b"\x01\x00" * 500)  # not what the checkpoint hashed
    state = {"shards": train[:1], "tmp_tokens": 500, "tmp_sha256": "0" * 64, "resume": [0, 400, 0]}
    splits = {
        "train": {**state, "tmp_start": train[1]["start"]},
        "val": {"shards": [], "tmp_tokens": 0, "tmp_sha256": "", "tmp_start": [0, 0, 0], "resume": [0, 0, 0]},
    }
    (folder / "progress.json").write_text(json.dumps({"format": shards.FORMAT, "header": header, "splits": splits}))
    data.prepare_data(cfg)
    assert shard_files(folder) == shard_files(built)


def test_a_corrupted_shard_is_detected_and_built_again_before_any_read(tmp_path, built, tokenizer_dir, corpus):
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"))
    folder = tmp_path / "cache" / built.name
    shutil.copytree(built, folder)
    reference = shard_files(folder)
    with open(folder / "train_000002.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    (folder / "val_000000.bin").write_bytes(b"\x00" * 10)
    prepared = data.prepare_data(cfg)
    assert shard_files(folder) == reference
    docs = documents(600)
    val = sources.held_out(np.arange(600), 0.05)
    train_docs = [d for d, v in zip(docs, val, strict=True) if not v]
    assert np.array_equal(np.asarray(prepared.train), expected_tokens(tokenizer_dir, train_docs))


def test_damaged_stamps_rehash_every_shard_and_a_damaged_manifest_is_one_line(tmp_path, built, tokenizer_dir, corpus):
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"))
    folder = tmp_path / "cache" / built.name
    shutil.copytree(built, folder)
    reference = shard_files(folder)
    with open(folder / "train_000002.bin", "r+b") as f:  # corrupt, with its stamp forgotten as well
        f.seek(100)
        f.write(b"\xff\xff")
    (folder / "verified.json").write_text('{"train_000000.bin": [1')  # cut off
    data.prepare_data(cfg)
    assert shard_files(folder) == reference  # hashed again, the corrupt shard found and rebuilt
    assert set(json.loads((folder / "verified.json").read_text())) == {p.name for p in folder.glob("*.bin")}
    (folder / "manifest.json").write_text('{"format": ')
    with pytest.raises(UserError) as refused:
        data.prepare_data(cfg)
    assert str(refused.value) == (
        f"the token cache's manifest {folder / 'manifest.json'} does not read (Expecting value: line 1 column 12 "
        "(char 11)); delete that folder to build it again"
    )


def test_a_shard_that_comes_out_different_when_rebuilt_is_refused_not_trained_on(
    tmp_path, built, tokenizer_dir, corpus
):
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"))
    folder = tmp_path / "cache" / built.name
    shutil.copytree(built, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["sha256"] = "0" * 64  # as if the documents had changed since
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "train_000001.bin").write_bytes(b"\x00\x01" * 10)
    with pytest.raises(UserError) as info:
        data.prepare_data(cfg)
    assert str(info.value) == (
        f"the documents of {cfg.dataset} changed since the token cache {folder} was built "
        "(train_000001.bin came out different); delete that folder to build it again"
    )
    assert not (folder / "train_000001.bin").exists()


def test_two_concurrent_preparers_build_once_and_both_read(tmp_path, tokenizer_dir, corpus, monkeypatch):
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"))
    builds = []
    build = shards.build

    def counted(*args, **kwargs):
        builds.append(threading.current_thread().name)
        return build(*args, **kwargs)

    monkeypatch.setattr(data, "build", counted)
    results: dict[str, data.TokenData] = {}
    threads = [threading.Thread(target=lambda n=n: results.update({n: data.prepare_data(cfg)}), name=n) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and set(results) == {"a", "b"}
    assert np.array_equal(np.asarray(results["a"].train), np.asarray(results["b"].train))


def test_a_waiter_on_a_lock_file_removed_meanwhile_never_holds_the_lock_beside_a_newcomer(tmp_path):
    """prepare_data removes the lock file it made when bad input left nothing built; a process that waited
    on it must not go on beside one that made the file anew (both would build the entry)."""
    lock = tmp_path / ".entry.lock"
    inside, peak = [0], [0]

    def hold() -> None:
        with data.cache_lock(lock):
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            time.sleep(0.3)
            inside[0] -= 1

    first = data.cache_lock(lock)
    first.__enter__()
    waiter = threading.Thread(target=hold)
    waiter.start()
    time.sleep(0.3)  # the waiter is blocked on the file
    lock.unlink()  # as prepare_data takes back the lock file of a failed start
    first.__exit__(None, None, None)
    newcomer = threading.Thread(target=hold)
    newcomer.start()
    waiter.join(10)
    newcomer.join(10)
    assert peak == [1] and lock.exists()


def test_a_vocabulary_above_65536_ids_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    big = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="[UNK]")
    big.save_pretrained(tmp_path / "big")
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(50)) for i in range(40)]
    corpus = write_parquet(docs, tmp_path / "c")
    prepared = data.prepare_data(data_cfg(tmp_path, tmp_path / "big", str(corpus), val_fraction=0.1))
    manifest = json.loads((entry_of(prepared) / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and prepared.train.dtype == np.uint32
    val = sources.held_out(np.arange(40), 0.1)
    expected = [t for d, v in zip(docs, val, strict=True) if not v for t in [*big(d)["input_ids"], 0]]
    assert np.array_equal(np.asarray(prepared.train), expected) and max(expected) > 65_535


# -- sources -------------------------------------------------------------------------------------------


def test_parquet_jsonl_csv_and_save_to_disk_give_the_same_tokens_for_the_same_documents(tmp_path, tokenizer_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.csv as pacsv

    docs = documents(120, seed=4)
    write_parquet(docs, tmp_path / "pq", per_file=50)
    (tmp_path / "j").mkdir()
    for n, i in enumerate(range(0, 120, 70)):
        lines = [json.dumps({"text": d, "url": "x"}) for d in docs[i : i + 70]]
        (tmp_path / "j" / f"{n}.jsonl").write_text("\n".join(lines) + "\n")
    pacsv.write_csv(pa.table({"text": docs}), tmp_path / "docs.csv")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(tmp_path / "saved")
    prepared = [
        data.prepare_data(data_cfg(tmp_path, tokenizer_dir, spec, val_fraction=0.1))
        for spec in (
            str(tmp_path / "pq"),
            str(tmp_path / "j" / "*.jsonl"),
            str(tmp_path / "docs.csv"),
            str(tmp_path / "saved"),
        )
    ]
    val = sources.held_out(np.arange(120), 0.1)
    train = expected_tokens(tokenizer_dir, [d for d, v in zip(docs, val, strict=True) if not v])
    for p in prepared:
        assert np.array_equal(np.asarray(p.train), train)
        assert np.array_equal(np.asarray(p.val), np.asarray(prepared[0].val)) and len(p.val) > 0


@pytest.mark.parametrize("saved", [True, False])
def test_a_named_validation_split_that_is_the_training_split_is_refused_with_nothing_written(
    tmp_path, tokenizer_dir, saved
):
    """A save_to_disk folder, and a hub name: refused before the hub is asked anything."""
    import datasets

    if saved:
        splits = {"train": documents(30), "validation": documents(5, seed=2)}
        datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
            tmp_path / "saved"
        )
    dataset = str(tmp_path / "saved") if saved else "someone/corpus"
    with pytest.raises(UserError) as refused:
        data.prepare_data(data_cfg(tmp_path, tokenizer_dir, dataset, val_split="train"))
    assert str(refused.value) == (
        "data.val_split=train is data.split itself: validation documents are trained on; name another split, "
        "or leave data.val_split unset to hold out documents"
    )
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_single_parquet_file_and_a_named_validation_set_of_local_files(tmp_path, tokenizer_dir):
    write_parquet(documents(60), tmp_path / "train", per_file=60)
    write_parquet(documents(10, seed=3), tmp_path / "val", per_file=10)
    cfg = data_cfg(
        tmp_path, tokenizer_dir, str(tmp_path / "train" / "part-000.parquet"), val_split=str(tmp_path / "val")
    )
    prepared = data.prepare_data(cfg)
    assert np.array_equal(np.asarray(prepared.train), expected_tokens(tokenizer_dir, documents(60)))
    assert np.array_equal(np.asarray(prepared.val), expected_tokens(tokenizer_dir, documents(10, seed=3)))


def test_validation_texts_are_the_corpus_validation_split_without_keeping_or_reading_training_files(
    tmp_path, tokenizer_dir, monkeypatch
):
    held = data_cfg(tmp_path, tokenizer_dir, str(write_parquet(documents(200), tmp_path / "all")), val_fraction=0.1)
    assert data.validation_texts(held) == data.load_corpus(held).val and len(data.validation_texts(held)) > 0
    write_parquet(documents(60), tmp_path / "train", per_file=30)
    write_parquet(documents(10, seed=3), tmp_path / "val", per_file=10)
    named = data_cfg(tmp_path, tokenizer_dir, str(tmp_path / "train"), val_split=str(tmp_path / "val"))
    expected = data.load_corpus(named).val
    assert expected == documents(10, seed=3)
    rows_of = sources._rows_of

    def refuse_training_files(path, *args):
        assert "train" not in path.parts, f"{path} was read"
        return rows_of(path, *args)

    monkeypatch.setattr(sources, "_rows_of", refuse_training_files)
    assert data.validation_texts(named) == expected


def test_validation_files_among_the_training_files_are_refused_for_a_new_cache_and_warned_of_for_an_old_one(
    tmp_path, tokenizer_dir, caplog, monkeypatch
):
    write_parquet(documents(60), tmp_path / "owt" / "train", per_file=30)
    write_parquet(documents(10, seed=3), tmp_path / "owt" / "val", per_file=10)
    cfg = data_cfg(tmp_path, tokenizer_dir, str(tmp_path / "owt"), val_split=str(tmp_path / "owt" / "val"))
    unsound = (
        f"data.val_split={tmp_path / 'owt' / 'val'} names 1 of data.dataset's own files "
        f"({tmp_path / 'owt' / 'val' / 'part-000.parquet'}): validation documents are trained on; point "
        "data.dataset at the training files alone (their folder or a glob)"
    )
    with pytest.raises(UserError) as refused:
        data.prepare_data(cfg)
    assert str(refused.value) == unsound
    assert not (tmp_path / "cache").exists()
    # a run prepared before this check existed goes on with its cache (its resume must not be refused)
    with monkeypatch.context() as patched:
        patched.setattr(sources, "data_files_source", sound_files_source)
        built_before = entry_of(data.prepare_data(cfg))
    caplog.clear()
    assert entry_of(data.prepare_data(cfg)) == built_before
    assert caplog.messages == [f"{unsound} (the token cache {built_before} was built so; it is used as it is)"]


def sound_files_source(cfg, paths):
    """data_files_source as it was before the overlap check: the same key, nothing flagged."""
    source = DATA_FILES_SOURCE(cfg, paths)
    source.unsound_split = None
    return source


def test_csv_values_that_span_lines_are_read_past_the_first_block(tmp_path, tokenizer_dir):
    """pyarrow reads a CSV in blocks of 1 MB: a value with newlines must not lose its place between them."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    docs = [("\n".join(documents(4, seed=i))) for i in range(400)]  # ~2 MB, every value over several lines
    pacsv.write_csv(pa.table({"text": docs}), tmp_path / "web.csv")
    assert (tmp_path / "web.csv").stat().st_size > 2**20
    read, _ = sources.files_reader([tmp_path / "web.csv"], "text")
    assert [doc for batch in read(0) for doc in batch] == docs


def test_a_failed_preparation_leaves_an_entry_another_process_made_meanwhile(tmp_path, tokenizer_dir, monkeypatch):
    """The cache root did not exist when this process looked; another one made its own entry there before
    this one failed on bad input: only this one's lock file goes, the root and the other entry stay."""
    cfg = data_cfg(tmp_path, tokenizer_dir, str(write_parquet(documents(30), tmp_path / "docs")))
    root = tmp_path / "cache"

    def another_process_meanwhile(*args, **kwargs):  # then this one fails on its input, inside its lock
        (root / "hf_dataset-0123456789abcdef").mkdir()
        (root / "hf_dataset-0123456789abcdef" / "manifest.json").write_text("{}")
        raise UserError("this process's input is bad")

    monkeypatch.setattr(data, "read_manifest", another_process_meanwhile)
    with pytest.raises(UserError):
        data.prepare_data(cfg)
    assert sorted(p.name for p in root.iterdir()) == ["hf_dataset-0123456789abcdef"]


def test_resuming_a_stream_mid_way_reads_the_same_documents(tmp_path):
    docs = documents(200)
    write_parquet(docs, tmp_path / "p", per_file=70)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:90]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[90:]))
    for paths in (sorted((tmp_path / "p").glob("*.parquet")), [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]):
        read, _ = sources.files_reader(paths, "text")
        for start in (0, 39, 70, 95, 199, 200):
            assert [d for batch in read(start) for d in batch] == docs[start:], (paths[0].suffix, start)


# -- validation -----------------------------------------------------------------------------------------


def test_held_out_documents_are_the_configured_share_spread_through_the_corpus():
    val = sources.held_out(np.arange(1000), 0.05)
    assert val.sum() == 50 == sources.held_out_count(1000, 0.05)
    assert np.all(np.diff(np.flatnonzero(val)) == 20)  # one every 20 documents, not the tail
    assert sources.held_out(np.arange(37), 0.05).sum() == 2  # round(1.85)


def text_cfg(tmp_path, files, **overrides):
    option = OmegaConf.load(f"{CONF_DIR}/data/text_files.yaml")
    mine = {"files": files, "cache_dir": str(tmp_path / "cache"), "tokenizer": {"vocab_size": 300}, "num_proc": 1}
    return OmegaConf.merge(OmegaConf.structured(DataConfig), option, mine, overrides)


def test_text_files_hold_out_whole_files_whatever_the_glob_order(tmp_path):
    for i in range(40):
        sub = tmp_path / "corpus" / ("deep" if i % 2 else "") / f"f{i:02d}.txt"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_text(f"file {i}\n" + "some words here\n" * 20)
    corpus = data.load_corpus(text_cfg(tmp_path, [str(tmp_path / "corpus" / "**" / "*.txt")]))
    assert len(corpus.val) == 2 and len(corpus.train) == 38  # 5% of 40 files, whole
    assert all(doc.startswith("file ") for doc in corpus.val)


def test_overlapping_patterns_read_each_file_once_so_no_validation_file_is_trained_on(tmp_path):
    """`**` matches the top level too: both patterns name the 15 top files, and the link names one of them."""
    for i in range(20):
        path = tmp_path / "corpus" / ("sub" if i % 4 == 0 else "") / f"f{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"document number {i}\n" + "some words here\n" * 20)
    (tmp_path / "link.txt").symlink_to(tmp_path / "corpus" / "f01.txt")
    patterns = [
        str(tmp_path / "corpus" / "*.txt"),
        str(tmp_path / "corpus" / "**" / "*.txt"),
        str(tmp_path / "link.txt"),
    ]
    assert data.text_file_paths(patterns) == [
        *sorted((tmp_path / "corpus").glob("*.txt")),
        *sorted((tmp_path / "corpus" / "sub").glob("*.txt")),
    ]
    corpus = data.load_corpus(text_cfg(tmp_path, patterns, val_fraction=0.1))
    assert (len(corpus.train), len(corpus.val)) == (18, 2) and not set(corpus.train) & set(corpus.val)


def test_a_text_without_newlines_and_a_few_long_lines_are_cut_at_the_share(tmp_path):
    (tmp_path / "one.txt").write_text("word " * 2000)  # no newline at all
    corpus = data.load_corpus(text_cfg(tmp_path, [str(tmp_path / "one.txt")]))
    assert len(corpus.train[0]) == 9500 and len(corpus.val[0]) == 500  # training text never emptied
    (tmp_path / "four.txt").write_text(("x" * 999 + "\n") * 4)  # four long lines: 0.1 gave 25%
    corpus = data.load_corpus(text_cfg(tmp_path, [str(tmp_path / "four.txt")]))
    assert (len(corpus.train[0]), len(corpus.val[0])) == (3800, 200)
    (tmp_path / "lines.txt").write_text("".join(f"line {i}\n" for i in range(1000)))  # a line boundary nearby
    corpus = data.load_corpus(text_cfg(tmp_path, [str(tmp_path / "lines.txt")]))
    assert corpus.val[0] == data.split_tail([(tmp_path / "lines.txt").read_text()], 0.05)[1][0]


def test_too_few_documents_for_the_share_is_one_line_and_nothing_written(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("some text\n" * 50)
    cfg = text_cfg(tmp_path, [str(tmp_path / "*.txt")])
    with pytest.raises(UserError) as info:
        data.prepare_data(cfg)
    assert str(info.value) == (
        f"{tmp_path / '*.txt'} holds 3 documents: too few to hold out data.val_fraction=0.05 of them for "
        "validation (0 would be) and keep training text; it needs at least 10 documents, or a larger "
        "data.val_fraction, or a named validation set (data.val_split)"
    )
    assert not (tmp_path / "cache").exists()


def test_a_run_dir_of_0_1_keeps_its_tail_split_and_its_model():
    from gpt2exp.config import typed

    record = OmegaConf.load(Path(__file__).parent / "fixtures" / "run_v0_1" / "config.yaml")
    cfg = typed(record)
    assert (cfg.data.holdout, cfg.data.num_proc, cfg.data.shard_tokens) == ("tail", None, 100_000_000)
    # and the model it built: transformers' default activation, the tokenizer's vocabulary, default kernels
    assert (cfg.model.activation, cfg.model.vocab_multiple, cfg.trainer.deterministic) == ("gelu_new", 1, False)
    docs = ["aaaa\nbbbb\n", "cccc\ndddd\n"]
    assert data.split_tail(docs, 0.25) == (["aaaa\nbbbb\n", "cccc\n"], ["dddd\n"])


# -- bad input ---------------------------------------------------------------------------------------------


def test_a_missing_column_names_the_columns(tmp_path, tokenizer_dir, corpus):
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus), text_column="body")
    with pytest.raises(UserError) as info:
        data.prepare_data(cfg)
    assert str(info.value) == (
        f"data.text_column=body is not a column of {corpus} (part-000.parquet); choose one of ['id', 'text']"
    )
    assert not (tmp_path / "cache").exists()


GOOD_ROWS = "".join(json.dumps({"text": f"a line of text, number {i}"}) + "\n" for i in range(30)).encode()


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("b.jsonl", b"{not json\n", "b.jsonl line 2 is not JSON (Expecting property name enclosed in double quotes); "
         "write one JSON object per line"),
        ("b.jsonl", b"[1, 2]\n", "b.jsonl line 2 is not a JSON object; write one object per line, its text under text"),
        ("b.jsonl", b'{"content": "x", "id": 1}\n', "b.jsonl line 2 has no text field (it has content, id); every row "
         "needs data.text_column=text"),
        ("b.jsonl", b'{"text": 5}\n', "data.text_column=text of {dir}/b.jsonl holds int values, not text; name its "
         "text column"),
        ("b.jsonl", b'{"text": "caf\xe9"}\n', "b.jsonl line 2 is not UTF-8 text; convert the file to UTF-8"),
        ("b.csv", b"text\ncaf\xe9\n", "b.csv cannot be read: In CSV column #0: CSV conversion error to string: "
         "invalid UTF8 data"),
    ],
)  # fmt: skip
def test_a_row_that_is_not_text_is_one_line_naming_the_file_and_leaves_no_cache(
    tmp_path, tokenizer_dir, name, content, error
):
    """After 30 good rows: no document is silently emptied or trained on as a number."""
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(GOOD_ROWS)
    first_row = GOOD_ROWS.splitlines(keepends=True)[0] if name.endswith(".jsonl") else b""
    (folder / name).write_bytes(first_row + content)  # a good row, then the bad one
    with pytest.raises(UserError) as info:
        data.prepare_data(data_cfg(tmp_path, tokenizer_dir, str(folder)))
    expected = error.format(dir=folder)
    said = re.sub(r"Row #\d+: ", "", str(info.value))  # pyarrow names the row only when it reads on one thread
    assert said == (expected if expected.startswith("data.") else f"{folder}/{expected}")
    assert not (tmp_path / "cache").exists()


def test_a_text_column_of_numbers_is_refused_in_parquet_and_read_as_text_in_csv(tmp_path, tokenizer_dir):
    """csv has no types: its values are the text written; parquet's integers are not text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": list(range(40))}), tmp_path / "pq" / "a.parquet")
    with pytest.raises(UserError) as info:
        data.prepare_data(data_cfg(tmp_path, tokenizer_dir, str(tmp_path / "pq")))
    assert str(info.value) == (
        f"data.text_column=text of {tmp_path / 'pq' / 'a.parquet'} holds int values, not text; name its text column"
    )
    (tmp_path / "numbers.csv").write_text("text\n" + "".join(f"{i}\n" for i in range(40)))
    prepared = data.prepare_data(data_cfg(tmp_path, tokenizer_dir, str(tmp_path / "numbers.csv"), val_fraction=0.1))
    held = sources.held_out(np.arange(40), 0.1)
    expected = expected_tokens(tokenizer_dir, [str(i) for i, v in zip(range(40), held, strict=True) if not v])
    assert np.array_equal(np.asarray(prepared.train), expected)


def test_a_killed_build_finished_by_a_later_start_and_refused_is_never_read_as_a_cache(tmp_path, tokenizer_dir):
    """Five JSON lines (their count unknown before reading): 5% of them holds out no document. The entry a
    killed build left is kept, but the refused build's manifest goes, so the next start refuses too."""
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    cfg = data_cfg(tmp_path, tokenizer_dir, str(tmp_path / "few.jsonl"))
    folder = tmp_path / "cache" / f"hf_dataset-{data.cache_key(cfg, sources.open_source(cfg))}"
    folder.mkdir(parents=True)  # as a killed build leaves it
    for _ in range(2):
        with pytest.raises(UserError) as info:
            data.prepare_data(cfg)
        assert str(info.value) == (
            f"{tmp_path / 'few.jsonl'} is too small to hold out data.val_fraction=0.05 of its documents for "
            "validation; add documents, raise data.val_fraction, or name a validation set"
        )
        assert folder.is_dir() and not (folder / "manifest.json").exists()


def test_an_empty_source_is_one_line_and_leaves_no_cache(tmp_path, tokenizer_dir):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = data_cfg(tmp_path, tokenizer_dir, str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError) as info:
        data.prepare_data(cfg)
    assert str(info.value) == f"{tmp_path / 'empty.jsonl'} holds no documents; check data.dataset / data.files"
    assert not (tmp_path / "cache").exists()


def test_a_tokenizer_without_end_of_text_is_refused(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "noeos")
    with pytest.raises(UserError) as info:
        data.prepare_data(data_cfg(tmp_path, tmp_path / "noeos", str(corpus)))
    assert str(info.value) == (
        f"tokenizer {tmp_path / 'noeos'} has no end-of-text token (eos_token), which ends every document; "
        "pick a GPT-style tokenizer or set its eos_token"
    )
    assert not (tmp_path / "cache").exists()


def test_a_cache_of_another_format_is_refused_untouched(tmp_path, built, tokenizer_dir, corpus):
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"))
    folder = tmp_path / "cache" / built.name
    shutil.copytree(built, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    before = shard_files(folder)
    with pytest.raises(UserError) as info:
        data.prepare_data(cfg)
    assert str(info.value) == (
        f"the token cache {folder} was written in format 1 and this gpt2exp reads format {shards.FORMAT}; "
        "delete that folder to build it again, or set data.cache_dir to another folder"
    )
    assert shard_files(folder) == before


def test_a_full_disk_removes_the_partial_shards_keeps_the_finished_ones_and_a_rerun_finishes(
    tmp_path, built, tokenizer_dir, corpus, monkeypatch
):
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"))
    folder = tmp_path / "cache" / built.name
    write = shards.SplitWriter.write

    def filling(self, tokens, position_of):
        if self.split == "train" and len(self.shards) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, tokens, position_of)

    monkeypatch.setattr(shards.SplitWriter, "write", filling)
    with pytest.raises(shards.DiskFull) as info:
        data.prepare_data(cfg)
    finished = sorted(p.name for p in folder.glob("*.bin"))
    assert str(info.value) == (
        f"the disk filled while writing the token cache {folder}: the partial shards were removed and the "
        f"{len(finished)} finished ones kept; free some space (or set data.cache_dir) and run again to continue"
    )
    assert [f"train_{i:06d}.bin" for i in range(4)] == [n for n in finished if n.startswith("train")]
    assert not list(folder.glob("*.tmp")) and not (folder / "manifest.json").exists()
    monkeypatch.undo()
    data.prepare_data(cfg)
    assert shard_files(folder) == shard_files(built)


# -- the sampler over shards --------------------------------------------------------------------------------


def test_shards_slice_as_the_flat_array_does_empty_and_backwards_slices_included(tmp_path):
    import itertools

    flat = np.arange(23, dtype=np.uint16)
    paths = []
    for i, (a, b) in enumerate([(0, 7), (7, 8), (8, 20), (20, 23)]):  # one shard of a single token
        flat[a:b].tofile(tmp_path / f"s{i}.bin")
        paths.append(tmp_path / f"s{i}.bin")
    stream = data.TokenShards(paths, np.uint16)
    ends, steps = [None, -30, -5, 0, 3, 7, 8, 22, 23, 30], [None, 1, 2, 5, -1, -3]
    for start, stop, step in itertools.product(ends, ends, steps):
        part = slice(start, stop, step)
        assert np.array_equal(stream[part], flat[part]) and stream[part].dtype == flat.dtype, part
    assert stream[5:5].shape == (0,) and stream[-1] == 22


def test_shards_read_as_one_stream_give_the_flat_arrays_batches(tmp_path):
    tokens = np.arange(20_000, dtype=np.uint32).astype(np.uint16)
    paths = []
    for i, (a, b) in enumerate([(0, 7_000), (7_000, 7_100), (7_100, 20_000)]):
        paths.append(tmp_path / f"train_{i:06d}.bin")
        tokens[a:b].tofile(paths[-1])
    sharded = data.TokenShards(paths, np.uint16)
    assert len(sharded) == 20_000 and np.array_equal(np.asarray(sharded), tokens)
    assert np.array_equal(sharded[6_990:7_120], tokens[6_990:7_120]) and sharded[7_050] == tokens[7_050]
    flat = data.BatchSampler(tokens, block_size=64, batch_size=16, seed=5)
    over = data.BatchSampler(sharded, block_size=64, batch_size=16, seed=5)
    for _ in range(40):  # 311 windows: the second epoch starts at batch 20
        (x1, y1), (x2, y2) = flat.next_batch(), over.next_batch()
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and x2.dtype == np.int64
    assert over.epoch == 2 and over._order.dtype == np.uint32  # 4 bytes per window


def test_the_shard_sampler_resumes_to_the_exact_batch_across_shard_and_epoch_boundaries(tmp_path):
    tokens = np.arange(9_000, dtype=np.uint16)
    paths = []
    for i in range(0, 9_000, 150):  # shards shorter than a window: most windows cross a shard boundary
        paths.append(tmp_path / f"train_{i:06d}.bin")
        tokens[i : i + 150].tofile(paths[-1])
    sharded = data.TokenShards(paths, np.uint16)
    a = data.BatchSampler(sharded, block_size=100, batch_size=7, seed=2)
    for _ in range(12):  # 89 windows an epoch: batch 13 ends epoch 0 and starts epoch 1
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(4)]
    identity = {"windows": 89, "tokens": 9_000, "digest": sampled_digest(tokens)}
    assert state == {"seed": 2, "epoch": 0, "offset": 84, **identity}
    assert a.epoch == 1
    b = data.BatchSampler(sharded, block_size=100, batch_size=7, seed=0)
    b.load_state_dict(json.loads(json.dumps(state)))
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(4)), strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
        assert np.array_equal(x2, x2[:, :1] + np.arange(100)) and np.array_equal(y2, x2 + 1)  # whole windows
    starts = np.concatenate([x[:, 0] for x, _ in expected])
    assert len(set(starts.tolist())) == 28  # 5 windows end epoch 0, 23 start epoch 1; each epoch's are
    assert len(set(starts[:5] % 100)) == 1 and len(set(starts[5:] % 100)) == 1  # a block apart: none overlap


def test_val_batches_read_windows_across_shards(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    tokens[:2500].tofile(tmp_path / "a.bin")
    tokens[2500:].tofile(tmp_path / "b.bin")
    sharded = data.TokenShards([tmp_path / "a.bin", tmp_path / "b.bin"], np.uint16)
    for (x1, y1), (x2, y2) in zip(data.val_batches(tokens, 32, 4, 3), data.val_batches(sharded, 32, 4, 3), strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


# -- presets ---------------------------------------------------------------------------------------------------


def test_the_fineweb_preset_is_the_llm_c_recipe(compose):
    cfg = compose(["+experiment=gpt2_124m_fineweb"])
    d, t = cfg.data, cfg.trainer
    assert (d.source, d.dataset, d.config_name, d.text_column, d.tokenizer.name) == (
        "hf_dataset",
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "text",
        "gpt2",
    )
    tokens_per_step = t.batch_size * t.grad_accum_steps * cfg.model.block_size
    assert tokens_per_step == 524_288 and (cfg.model.n_layer, cfg.model.n_embd) == (12, 768)
    assert abs(t.max_steps * tokens_per_step - 10e9) < 1e6  # 19,073 steps: llm.c's 10B tokens
    assert (cfg.optimizer.lr, cfg.scheduler.warmup_steps, cfg.scheduler.name) == (6e-4, 715, "cosine")


def test_the_openwebtext_preset_is_nanogpts_recipe(compose):
    cfg = compose(["+experiment=gpt2_124m_openwebtext"])
    t = cfg.trainer
    assert (cfg.data.dataset, cfg.data.tokenizer.name, cfg.data.val_fraction) == (
        "Skylion007/openwebtext",
        "gpt2",
        0.0005,
    )
    assert t.batch_size * t.grad_accum_steps * cfg.model.block_size == 491_520
    assert (cfg.optimizer.lr, cfg.scheduler.warmup_steps, t.max_steps) == (6e-4, 2000, 600_000)


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KB tmpfs (a real full disk; needs root), grown with grow(size), unmounted afterwards."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, grow
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_keeps_the_finished_shards_and_a_rerun_finishes(
    tmp_path, built, tokenizer_dir, corpus, small_disk
):
    mount, grow = small_disk
    cfg = data_cfg(tmp_path, tokenizer_dir, str(corpus / "*.parquet"), cache_dir=str(mount / "cache"))
    with pytest.raises(shards.DiskFull) as info:
        data.prepare_data(cfg)
    folder = mount / "cache" / built.name
    finished = sorted(p.name for p in folder.glob("*.bin"))
    assert str(info.value).startswith(f"the disk filled while writing the token cache {folder}: the partial shards")
    assert f"the {len(finished)} finished ones kept" in str(info.value) and len(finished) >= 5
    assert not list(folder.glob("*.tmp")) and not (folder / "manifest.json").exists()
    grow("4m")
    data.prepare_data(cfg)
    assert shard_files(folder) == shard_files(built)
