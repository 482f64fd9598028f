"""`python -m gpt2exp.data prepare` and the GPT-2 presets, through the real command line, on a local
stand-in for FineWeb-Edu (parquet files with a `text` column, a GPT-2-style tokenizer saved here)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2exp import data
from tests.conftest import FAST, run_cli
from tests.test_data_shards import documents, write_parquet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> tuple[Path, Path]:
    """(parquet folder of 4,000 documents (~4 MB of text: a 0.05% share is 2 documents; 16 batches
    to tokenize), a saved byte-level BPE tokenizer with <|endoftext|>)."""
    root = tmp_path_factory.mktemp("fineweb")
    data.train_bpe(documents(200, seed=1), 500, root / "gpt2-tokenizer")
    return write_parquet(documents(4000), root / "sample" / "10BT", per_file=500), root / "gpt2-tokenizer"


def shards_of(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.glob("*/*.bin"))}


def test_prepare_then_train_the_fineweb_preset_on_a_local_stand_in(tmp_path, stand_in):
    parquet, tokenizer = stand_in
    local = [f"data.dataset={parquet}", f"data.tokenizer.name={tokenizer}", f"data.cache_dir={tmp_path / 'cache'}"]
    prepared = run_cli("gpt2exp.data", "prepare", "+experiment=gpt2_124m_fineweb", *local, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    manifest = json.loads((entry / "manifest.json").read_text())
    lines = prepared.stdout.splitlines()
    assert lines[0] == f"token cache  {entry}"
    assert lines[1] == f"train        {manifest['splits']['train']['tokens']:,} tokens in 1 shard"
    assert lines[2] == f"val          {manifest['splits']['val']['tokens']:,} tokens in 1 shard"
    assert lines[3] == f"tokenizer    {tokenizer} (vocab 500, uint16)"
    assert manifest["settings"]["val_fraction"] == 0.0005 and manifest["splits"]["val"]["tokens"] > 0
    before = shards_of(tmp_path / "cache")

    small = ["model=gpt2_tiny", "trainer.grad_accum_steps=1"]  # FAST: 4 windows of 32 tokens
    train = run_cli(
        "gpt2exp.train",
        "+experiment=gpt2_124m_fineweb",
        *local,
        *FAST,
        *small,
        "trainer.max_steps=2",
        "trainer.precision=fp32",
        "trainer.eval_batches=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "tokenizing" not in (tmp_path / "run" / "train.log").read_text()  # the prepared shards were read
    assert shards_of(tmp_path / "cache") == before
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_bytes() == (
        tokenizer / "tokenizer.json"
    ).read_bytes()


def test_a_killed_prepare_continues_to_the_same_shards(tmp_path, stand_in):
    _, tokenizer = stand_in
    parquet = write_parquet(documents(10_000, seed=5), tmp_path / "big", per_file=2500)  # ~10 MB: 40 batches
    args = ["data=hf_dataset", f"data.dataset={parquet}", f"data.tokenizer.name={tokenizer}", "data.shard_tokens=50000"]
    reference = run_cli(
        "gpt2exp.data", "prepare", *args, f"data.cache_dir={tmp_path / 'ref'}", "data.num_proc=2", cwd=tmp_path
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "gpt2exp.data", "prepare", *args, f"data.cache_dir={cache}", "data.num_proc=1"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    progress = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(cache.glob("*/progress.json"))
        if found and len(json.loads(found[0].read_text())["splits"]["train"]["shards"]) >= 2:
            progress = found[0]
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert progress is not None, "the preparation finished before it could be killed"
    assert not (progress.parent / "manifest.json").exists()

    resumed = run_cli("gpt2exp.data", "prepare", *args, f"data.cache_dir={cache}", "data.num_proc=1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing the token cache" in resumed.stderr
    assert shards_of(cache) == shards_of(tmp_path / "ref") and len(shards_of(cache)) > 4


def test_prepare_refuses_a_missing_column_in_one_line_and_writes_nothing(tmp_path, stand_in):
    parquet, tokenizer = stand_in
    result = run_cli(
        "gpt2exp.data",
        "prepare",
        "data=hf_dataset",
        f"data.dataset={parquet}",
        "data.text_column=content",
        f"data.tokenizer.name={tokenizer}",
        f"data.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: data.text_column=content is not a column of {parquet} (part-000.parquet); choose one of ['id', 'text']"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_prepare_refuses_resume_in_one_line_rather_than_prepare_the_default_data(tmp_path):
    """resume= composes (it is a key of the config) but names a run whose data.* prepare would not read."""
    result = run_cli(
        "gpt2exp.data", "prepare", f"resume={tmp_path / 'run'}", "data.tokenizer.vocab_size=300", cwd=tmp_path
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: prepare composes the data config its overrides give and resumes no run; drop resume=, and pass "
        "the run's data.* settings (its config.yaml) to prepare that data"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
