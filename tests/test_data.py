"""Corpus, tokenizer, token cache and the resumable sampler."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from gpt2exp import data
from gpt2exp.config import CONF_DIR, DataConfig
from gpt2exp.errors import UserError
from gpt2exp.sampler import SAMPLED_SPANS, SPAN_TOKENS, sampled_digest
from tests.conftest import trade_two_token_ids


def data_cfg(tmp_path, source="shakespeare", vocab_size=300, **overrides):
    """The `data` section of data=<source> as conf/ gives it, with its own cache and a small BPE."""
    option = OmegaConf.load(f"{CONF_DIR}/data/{source}.yaml")
    mine = {"cache_dir": str(tmp_path / "cache"), "tokenizer": {"vocab_size": vocab_size}}
    return OmegaConf.merge(OmegaConf.structured(DataConfig), option, mine, overrides)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    return data.prepare_data(data_cfg(tmp_path_factory.mktemp("data"), vocab_size=512))


def test_the_shakespeare_corpus_is_every_play_as_plain_text():
    files = data.shakespeare_files()
    assert len(files) >= 36
    assert any(f.name == "hamlet.md" for f in files)
    text = data.markdown_to_text("# Hamlet\n\n**BERNARDO**  \nWho's there?\n\n_Exit_\n")
    assert text == "Hamlet\n\nBERNARDO\nWho's there?\n\nExit\n"


def test_split_tail_cuts_the_last_fraction_at_a_line_boundary():
    docs = ["aaaa\nbbbb\n", "cccc\ndddd\n"]
    train, val = data.split_tail(docs, 0.25)  # 5 of 20 characters
    assert train == ["aaaa\nbbbb\n", "cccc\n"] and val == ["dddd\n"]
    assert "".join(train + val) == "".join(docs)


def test_tokenizer_round_trips_text(shakespeare):
    tok = shakespeare.tokenizer
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 512 and tok.eos_token == "<|endoftext|>"


def test_tokenizer_files_load_with_autotokenizer(shakespeare):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shakespeare.tokenizer_dir)
    assert tok("Exeunt")["input_ids"] == shakespeare.tokenizer("Exeunt")["input_ids"]


def test_token_arrays_are_flat_and_split(shakespeare):
    assert shakespeare.train.dtype == np.uint16
    total = len(shakespeare.train) + len(shakespeare.val)
    assert 0.03 < len(shakespeare.val) / total < 0.07  # val_fraction 0.05 of the characters
    assert int(shakespeare.train.max()) < 512


def test_second_prepare_reuses_the_cache(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("to be or not to be, that is the question\n" * 200)
    cfg = data_cfg(tmp_path, source="text_files", files=[str(tmp_path / "a.txt")], val_fraction=0.1)
    first = data.prepare_data(cfg)

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(data, "train_bpe", no_training)
    second = data.prepare_data(cfg)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    cache_dirs = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # not the lock
    assert len(cache_dirs) == 1 and cache_dirs[0].startswith("text_files-")


def test_changing_the_vocab_size_makes_a_new_cache_entry(tmp_path):
    (tmp_path / "a.txt").write_text("now is the winter of our discontent\n" * 200)
    base = {"source": "text_files", "files": [str(tmp_path / "a.txt")]}
    data.prepare_data(data_cfg(tmp_path, **base))
    data.prepare_data(data_cfg(tmp_path, **{**base, "vocab_size": 280}))
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_the_shakespeare_cache_key_is_the_same_wherever_the_plays_are_installed(tmp_path, monkeypatch):
    import shutil

    from gpt2exp import sources

    cfg = data_cfg(tmp_path)
    installed = sources.shakespeare_files()
    here = data.cache_key(cfg, sources.shakespeare_source(cfg))
    moved = []
    for path in installed:  # as in a virtual environment at another path
        moved.append(tmp_path / "elsewhere" / path.parent.name / path.name)
        moved[-1].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, moved[-1])
    monkeypatch.setattr(sources, "shakespeare_files", lambda: moved)
    assert data.cache_key(cfg, sources.shakespeare_source(cfg)) == here
    moved[7].write_bytes(moved[7].read_bytes() + b"\n")  # one play's text changed: a new key
    assert data.cache_key(cfg, sources.shakespeare_source(cfg)) != here


def token_ids_error(cache_entry, recorded) -> str:
    return (
        f"the data cache's tokenizer ({cache_entry}) gives other token ids than the tokenizer this run "
        f"trained with ({recorded}): resuming would train on other tokens. The cache was built again: the "
        "training text is not the run's (a data file edited or replaced; a file several data.files patterns match "
        "is now read once), or another tokenizers version built it (run.json names the run's); restore the run's "
        "data or resume with data.cache_dir set to the run's cache, or start a new run"
    )


def test_a_run_goes_on_only_with_a_cache_giving_its_own_token_ids(tmp_path):
    import shutil

    (tmp_path / "a.txt").write_text("to be or not to be, that is the question\n" * 300)
    cfg = data_cfg(tmp_path, source="text_files", files=[str(tmp_path / "a.txt")], val_fraction=0.1)
    first = data.prepare_data(cfg)
    entry = first.tokenizer_dir.parent
    same = tmp_path / "run" / "tokenizer"
    shutil.copytree(first.tokenizer_dir, same)
    assert np.array_equal(data.prepare_data(cfg, same).train, first.train)  # the same ids: goes on
    data.prepare_data(cfg, tmp_path / "run" / "none")  # a run recorded without its tokenizer: goes on
    other = trade_two_token_ids(shutil.copytree(first.tokenizer_dir, tmp_path / "other" / "tokenizer"))
    with pytest.raises(UserError) as error:
        data.prepare_data(cfg, other)
    assert str(error.value) == token_ids_error(entry, other)
    assert data.read_manifest(entry) is not None  # an existing entry stays


def test_a_rebuilt_cache_with_other_token_ids_is_refused_before_the_text_is_tokenized(tmp_path, monkeypatch):
    import shutil

    (tmp_path / "a.txt").write_text("now is the winter of our discontent\n" * 300)
    cfg = data_cfg(tmp_path, source="text_files", files=[str(tmp_path / "a.txt")], val_fraction=0.1)
    first = data.prepare_data(cfg)
    entry = first.tokenizer_dir.parent
    other = trade_two_token_ids(shutil.copytree(first.tokenizer_dir, tmp_path / "run" / "tokenizer"))
    shutil.rmtree(entry)  # the cache is built again

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the text was tokenized")

    monkeypatch.setattr(data, "build", no_tokenizing)
    with pytest.raises(UserError) as error:
        data.prepare_data(cfg, other)
    assert str(error.value) == token_ids_error(entry, other)
    assert not entry.exists()  # the entry it started is taken back


def test_a_missing_data_file_names_the_path(tmp_path):
    cfg = data_cfg(tmp_path, source="text_files", files=[str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match=r"data file not found: .*nope.txt; check the path in data.files"):
        data.prepare_data(cfg)


def test_hf_dataset_from_a_local_path(tmp_path):
    import datasets

    rows = {"content": [f"line {i} of the local data set, with some words" for i in range(300)]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    # load_dataset reads a saved folder by path through its arrow files
    cfg = data_cfg(tmp_path, source="hf_dataset", dataset=str(tmp_path / "ds"), text_column="content")
    prepared = data.prepare_data(cfg)
    assert len(prepared.train) > 1000 and len(prepared.val) > 0


def test_sampler_state_round_trip_gives_the_same_next_batches():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = data.BatchSampler(tokens, block_size=16, batch_size=8, seed=3)
    for _ in range(100):  # cross at least one epoch boundary (624 windows / 8 = 78 batches)
        a.next_batch()
    state = a.state_dict()
    assert state["epoch"] == 1
    expected = [a.next_batch() for _ in range(5)]
    b = data.BatchSampler(tokens, block_size=16, batch_size=8, seed=99)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(5)), strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_a_sampler_position_in_other_data_is_refused_and_one_saved_without_its_count_is_taken():
    tokens = np.arange(10_000, dtype=np.uint16)
    saved = data.BatchSampler(tokens, block_size=16, batch_size=8, seed=3)
    for _ in range(70):
        saved.next_batch()
    state = saved.state_dict()
    identity = {"windows": 624, "tokens": 10_000, "digest": sampled_digest(tokens)}
    assert state == {"seed": 3, "epoch": 0, "offset": 560, **identity}
    fewer = data.BatchSampler(tokens[:2000], block_size=16, batch_size=8, seed=3)  # 124 windows: 560 is past them
    with pytest.raises(UserError) as refused:
        fewer.load_state_dict(state)
    assert str(refused.value) == (
        "the checkpoint's data position is one in 624 training windows, and this run's data holds 124: the data "
        "changed since the run started; resume with the data it trained on (the same files, dataset revision and "
        "data.cache_dir)"
    )
    assert (fewer.seed, fewer.epoch, fewer.offset) == (3, 0, 0)  # untouched
    older = data.BatchSampler(tokens, block_size=16, batch_size=8, seed=99)
    older.load_state_dict({"seed": 3, "epoch": 0, "offset": 560})  # a checkpoint from before the count
    assert np.array_equal(older.next_batch()[0], saved.next_batch()[0])


def test_a_sampler_position_in_data_of_as_many_windows_but_other_tokens_is_refused():
    tokens = np.arange(10_000, dtype=np.uint16)
    state = data.BatchSampler(tokens, block_size=16, batch_size=8, seed=3).state_dict()
    longer = np.arange(10_001, dtype=np.uint16)  # one token more: still 624 windows
    edited = tokens.copy()
    edited[SPAN_TOKENS // 2] = 7  # a token inside the first sampled span
    for other, count in ((longer, 10_001), (edited, 10_000)):
        resumed = data.BatchSampler(other, block_size=16, batch_size=8, seed=3)
        assert resumed.num_windows == 624
        with pytest.raises(UserError) as refused:
            resumed.load_state_dict(state)
        assert str(refused.value) == (
            f"the checkpoint's data position is one in 10000 training tokens with digest {state['digest']}, and "
            f"this run's data is {count} tokens with digest {sampled_digest(other)}: the data changed since the run "
            "started; resume with the data it trained on (the same files, dataset revision and data.cache_dir)"
        )
    same = data.BatchSampler(tokens.astype(np.uint32), block_size=16, batch_size=8, seed=0)  # ids, not bytes
    same.load_state_dict(state)
    assert same.seed == 3


def test_the_sampled_digest_reads_spans_evenly_spread_over_the_stream():
    tokens = np.arange(1_000_000, dtype=np.uint32)
    assert sampled_digest(tokens) == sampled_digest(tokens.astype(np.int64))
    spans = np.linspace(0, len(tokens) - SPAN_TOKENS, num=SAMPLED_SPANS).astype(np.int64)
    inside, between = tokens.copy(), tokens.copy()
    inside[spans[-1] + SPAN_TOKENS - 1] = 0  # the last token: in the last span
    between[spans[1] - 1] = 0  # just before the second span: not read
    assert sampled_digest(inside) != sampled_digest(tokens)
    assert sampled_digest(between) == sampled_digest(tokens)
    short = np.arange(100, dtype=np.uint16)  # fewer tokens than a span: the whole stream, spans overlapping
    assert sampled_digest(short) != sampled_digest(short[:99])


def test_sampler_targets_are_inputs_shifted_by_one_and_epochs_cover_every_window():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = data.BatchSampler(tokens, block_size=10, batch_size=7, seed=0)
    x, y = sampler.next_batch()
    assert np.array_equal(x[:, 1:], y[:, :-1]) and np.array_equal(y[:, -1], x[:, -1] + 1)
    sampler = data.BatchSampler(tokens, block_size=10, batch_size=1, seed=0)
    starts = sorted(int(sampler.next_batch()[0][0, 0]) for _ in range(sampler.num_windows))
    assert len(set(starts)) == sampler.num_windows and all((s - starts[0]) % 10 == 0 for s in starts)


def test_val_batches_are_fixed():
    tokens = np.arange(5000, dtype=np.uint16)
    first = data.val_batches(tokens, 32, 4, 3)
    second = data.val_batches(tokens, 32, 4, 3)
    assert len(first) == 3 and first[0][0].shape == (4, 32)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, second, strict=True))


def test_a_bpe_that_learns_fewer_tokens_than_asked_says_so(tmp_path, caplog):
    """A text with fewer merges than data.tokenizer.vocab_size asks: the model then embeds fewer rows (e.g.
    gpt2_124m's 50257 on Shakespeare learns 45,659)."""
    import logging

    from tokenizers import Tokenizer

    with caplog.at_level(logging.WARNING, logger="gpt2exp"):
        data.train_bpe(["to be or not to be\n"] * 3, 1000, tmp_path)
    learned = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    assert learned < 300
    assert [r.getMessage() for r in caplog.records] == [
        f"the BPE learned {learned} tokens, fewer than data.tokenizer.vocab_size=1000: the training text holds no "
        "more merges, and the model embeds the tokens learned"
    ]
