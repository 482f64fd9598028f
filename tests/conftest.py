"""Shared test set-up: offline hub, W&B off unless a test asks, one data cache per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("GPT2EXP_CACHE", tempfile.mkdtemp(prefix="gpt2exp-test-cache-"))

# A small, fast setup for runs in tests: ~60k parameters, 64-token windows, a 512-token BPE.
FAST = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "data.tokenizer.vocab_size=512",
    "trainer.batch_size=4",
    "trainer.eval_batches=2",
    "trainer.num_samples=1",
    "trainer.sample_tokens=8",
    "trainer.progress=false",
    "trainer.num_threads=1",
    "logger=none",
]


def trade_two_token_ids(tokenizer_dir: Path) -> Path:
    """Make the two newest tokens of the tokenizer saved in `tokenizer_dir` trade ids (in place)."""
    import json

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    one, other = sorted(vocab, key=vocab.get)[-2:]
    vocab[one], vocab[other] = vocab[other], vocab[one]
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(spec))
    return tokenizer_dir


def run_cli(
    module: str, *args: str, cwd: Path, timeout: float = 300, env: dict | None = None, unprivileged: bool = False
):
    """Run `python -m <module> args...` in `cwd`; returns the CompletedProcess (text). `unprivileged`:
    as root, with every capability dropped, so that permission bits hold as for any user."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*(without_capabilities() if unprivileged else []), sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def without_capabilities() -> list[str]:
    """The command prefix that runs a program as this user without root's power to ignore permission
    bits (util-linux's setpriv); nothing for another user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux), which drops root's capabilities")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


@pytest.fixture
def compose():
    """compose(overrides) -> the typed, validated job config (as the CLI would build it)."""
    from gpt2exp.composing import compose as compose_config
    from gpt2exp.config import register_schemas

    register_schemas()
    return lambda overrides=(): compose_config(CONF_DIR, list(overrides))
