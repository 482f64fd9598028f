"""`python -m gpt2exp.data prepare` and the GPT-2 presets, through the real command line, on a local
stand-in for FineWeb-Edu (parquet files with a `text` column, a GPT-2-style tokenizer saved here)."""

from __future__ import annotations

import hashlib
import json
import shutil
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


def test_a_cache_prepared_elsewhere_and_shared_read_only_trains_and_stays_untouched(tmp_path, stand_in):
    """Copied (new inodes: the checksums' stamps no longer match) and made read-only, as a cache prepared
    on one node and shared with users who may only read it. A setting it holds no entry for is one line."""
    from tests.conftest import without_capabilities
    from tests.test_resume import snapshot

    without_capabilities()  # skips where root cannot drop its power to ignore permission bits
    parquet, tokenizer = stand_in
    local = [f"data.dataset={parquet}", f"data.tokenizer.name={tokenizer}", f"data.cache_dir={tmp_path / 'shared'}"]
    preset = ["+experiment=gpt2_124m_fineweb", *local]
    prepared = run_cli("gpt2exp.data", "prepare", *preset, f"data.cache_dir={tmp_path / 'built'}", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    shutil.copytree(tmp_path / "built", tmp_path / "shared")
    for path in [tmp_path / "shared", *(tmp_path / "shared").rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(tmp_path / "shared")
    small = [*FAST, "model=gpt2_tiny", "trainer.grad_accum_steps=1", "trainer.precision=fp32", "trainer.eval_batches=1"]
    train = run_cli(
        "gpt2exp.train", *preset, *small, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path, unprivileged=True,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "tokenizing" not in log and "could not record the shards' checksums in" in log
    assert json.loads((tmp_path / "run" / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 32
    assert snapshot(tmp_path / "shared") == before

    other = run_cli(
        "gpt2exp.train", *preset, *small, "data.val_fraction=0.01", f"hydra.run.dir={tmp_path / 'other'}",
        cwd=tmp_path, unprivileged=True,
    )  # fmt: skip
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    (line,) = [x for x in other.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: the token cache {tmp_path / 'shared'}/hf_dataset-")
    assert line.endswith(
        " is not built and cannot be written there (Permission denied); set data.cache_dir to a dir you can write "
        "in, or prepare it where the cache is writable (python -m gpt2exp.data prepare)"
    )
    assert not (tmp_path / "other").exists() and snapshot(tmp_path / "shared") == before
