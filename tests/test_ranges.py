"""Every numeric key has a documented range, and a value outside it is refused before anything runs.

The ranges live in one table (`gpt2exp.config.RANGES`); each key's YAML comment states its range and
these tests hold the table, the schema and the comments together. A refused value is one line naming
the key, the value and the range, at compose time: the real CLI exits 2 and writes nothing. The
same goes for `python -m gpt2exp.generate`'s options. `checkpoint.keep_last=-1` keeps every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from gpt2exp.checkpoint import kept_reasons
from gpt2exp.config import RANGES, Config
from gpt2exp.errors import UserError
from tests.conftest import CONF_DIR, FAST, run_cli

# -- the table against the schema and the YAML comments -------------------------------------------


def numeric_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted keys of the schema typed int, float or a list of them (None allowed), bools excluded."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            keys += numeric_keys(kind, f"{prefix}{field.name}.")
            continue
        # `X | None` -> X, `list[X]` -> X
        options = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        options = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in options]
        if any(a is int or a is float for a in options):
            keys.append(f"{prefix}{field.name}")
    return keys


def yaml_comments() -> dict[str, list[tuple[str, str]]]:
    """{dotted key: [(file, comment)]} for every key set in conf/config.yaml and the group option files."""
    conf = Path(CONF_DIR)
    groups = ("model", "optimizer", "scheduler", "data", "checkpoint", "logger", "distributed")
    files = [conf / "config.yaml", *(p for group in groups for p in sorted((conf / group).glob("*.yaml")))]
    found: dict[str, list[tuple[str, str]]] = {}
    for path in files:
        prefix = "" if path.name == "config.yaml" else f"{path.parent.name}."
        stack: list[str] = []
        for line in path.read_text().splitlines():
            match = re.match(r"^( *)([A-Za-z_]+):([^#]*)(?:#(.*))?$", line)
            if not match:
                continue
            stack = [*stack[: len(match.group(1)) // 2], match.group(2)]
            key = prefix + ".".join(stack)
            found.setdefault(key, []).append((str(path.relative_to(conf)), (match.group(4) or "").strip()))
    return found


def test_every_numeric_key_of_the_schema_has_a_range():
    assert sorted(numeric_keys()) == sorted(RANGES)


def test_every_range_is_written_in_the_yaml_comment_of_its_key():
    comments = yaml_comments()
    for key, allowed in RANGES.items():
        assert comments.get(key), f"{key} is set in no YAML file"
        for path, comment in comments[key]:
            assert f"range {allowed.notation()}" in comment, f"{path}: {key}'s comment does not state its range"


def test_the_yaml_comments_state_the_ranges_in_words_a_user_reads():
    notations = {key: allowed.notation() for key, allowed in RANGES.items()}
    assert notations["trainer.batch_size"] == ">= 1"
    assert notations["trainer.num_threads"] == "null or >= 1"
    assert notations["model.dropout"] == "[0, 1)"
    assert notations["optimizer.lr"] == "> 0"
    assert notations["scheduler.min_lr_ratio"] == "[0, 1]"
    assert notations["data.val_fraction"] == "(0, 1)"
    assert notations["checkpoint.keep_last"] == "-1 or >= 1"


# -- refused and accepted values (in-process compose, as the CLI does it) ---------------------------

REFUSED = [
    ("seed=-1", "seed=-1 must be at least 0 and less than 4294967296"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be at least 0; set e.g. trainer.max_steps=0"),
    ("trainer.batch_size=0", "trainer.batch_size=0 must be at least 1; set e.g. trainer.batch_size=1"),
    (
        "trainer.grad_accum_steps=0",
        "trainer.grad_accum_steps=0 must be at least 1; set e.g. trainer.grad_accum_steps=1",
    ),
    ("trainer.log_every=0", "trainer.log_every=0 must be at least 1; set e.g. trainer.log_every=1"),
    ("trainer.eval_every=-5", "trainer.eval_every=-5 must be at least 0; set e.g. trainer.eval_every=0"),
    ("trainer.eval_batches=0", "trainer.eval_batches=0 must be at least 1; set e.g. trainer.eval_batches=1"),
    ("trainer.sample_every=-1", "trainer.sample_every=-1 must be at least 0; set e.g. trainer.sample_every=0"),
    ("trainer.num_samples=-1", "trainer.num_samples=-1 must be at least 0; set e.g. trainer.num_samples=0"),
    ("trainer.sample_tokens=0", "trainer.sample_tokens=0 must be at least 1; set e.g. trainer.sample_tokens=1"),
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1.0 must be at least 0; set e.g. trainer.grad_clip=0"),
    (
        "trainer.num_threads=0",
        "trainer.num_threads=0 must be null (torch's default) or at least 1; set e.g. trainer.num_threads=1",
    ),
    ("model.n_layer=0", "model.n_layer=0 must be at least 1; set e.g. model.n_layer=1"),
    ("model.n_head=0", "model.n_head=0 must be at least 1; set e.g. model.n_head=1"),
    ("model.n_embd=-8", "model.n_embd=-8 must be at least 1; set e.g. model.n_embd=1"),
    ("model.block_size=0", "model.block_size=0 must be at least 1; set e.g. model.block_size=1"),
    ("model.dropout=1.5", "model.dropout=1.5 must be at least 0 and less than 1"),
    ("model.dropout=1", "model.dropout=1.0 must be at least 0 and less than 1"),
    ("model.dropout=nan", "model.dropout=nan must be a finite number at least 0 and less than 1"),
    ("optimizer.lr=0", "optimizer.lr=0.0 must be greater than 0"),
    ("optimizer.lr=inf", "optimizer.lr=inf must be a finite number greater than 0"),
    (
        "optimizer.weight_decay=-0.1",
        "optimizer.weight_decay=-0.1 must be at least 0; set e.g. optimizer.weight_decay=0",
    ),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9, 1.0] must hold 2 numbers, each at least 0 and less than 1"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] must hold 2 numbers, each at least 0 and less than 1"),
    ("optimizer.eps=0", "optimizer.eps=0.0 must be greater than 0"),
    ("scheduler.warmup_steps=-1", "scheduler.warmup_steps=-1 must be at least 0; set e.g. scheduler.warmup_steps=0"),
    ("scheduler.min_lr_ratio=1.5", "scheduler.min_lr_ratio=1.5 must be at least 0 and at most 1"),
    (
        "scheduler.decay_steps=-1",
        "scheduler.decay_steps=-1 must be null (trainer.max_steps) or at least 0; set e.g. scheduler.decay_steps=0",
    ),
    ("data.val_fraction=0", "data.val_fraction=0.0 must be greater than 0 and less than 1"),
    (
        "data.tokenizer.vocab_size=256",
        "data.tokenizer.vocab_size=256 must be at least 257 (the 256 bytes and the end-of-text token); "
        "set e.g. data.tokenizer.vocab_size=257",
    ),
    ("checkpoint.every_steps=-3", "checkpoint.every_steps=-3 must be at least 0; set e.g. checkpoint.every_steps=0"),
    (
        "checkpoint.every_minutes=-1",
        "checkpoint.every_minutes=-1.0 must be at least 0; set e.g. checkpoint.every_minutes=0",
    ),
    (
        "checkpoint.keep_last=0",
        "checkpoint.keep_last=0 must be -1 (keep all) or at least 1; set e.g. checkpoint.keep_last=1",
    ),
    (
        "checkpoint.keep_last=-2",
        "checkpoint.keep_last=-2 must be -1 (keep all) or at least 1; set e.g. checkpoint.keep_last=1",
    ),
    ("checkpoint.keep_best=-1", "checkpoint.keep_best=-1 must be at least 0; set e.g. checkpoint.keep_best=0"),
    ("checkpoint.keep_every=-1", "checkpoint.keep_every=-1 must be at least 0; set e.g. checkpoint.keep_every=0"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED, ids=[o for o, _ in REFUSED])
def test_a_value_outside_its_range_is_refused_naming_key_value_and_range(compose, override, message):
    with pytest.raises(UserError) as caught:
        compose([override])
    assert str(caught.value) == message


def test_sgd_momentum_has_its_range(compose):
    with pytest.raises(UserError) as caught:
        compose(["optimizer=sgd", "optimizer.momentum=1"])
    assert str(caught.value) == "optimizer.momentum=1.0 must be at least 0 and less than 1"


ACCEPTED = [
    *("seed=0", "trainer.max_steps=0", "trainer.eval_every=0", "trainer.num_samples=0", "trainer.grad_clip=0"),
    *("trainer.num_threads=null", "trainer.num_threads=1", "model.dropout=0", "model.dropout=0.999"),
    *("optimizer.weight_decay=0", "optimizer.betas=[0,0.999]", "optimizer.lr=1e-12", "scheduler.warmup_steps=0"),
    *("scheduler.min_lr_ratio=0", "scheduler.min_lr_ratio=1", "scheduler.decay_steps=null", "scheduler.decay_steps=0"),
    *("checkpoint.keep_last=-1", "checkpoint.keep_last=1", "checkpoint.keep_best=0", "checkpoint.every_steps=0"),
    *(
        "checkpoint.every_minutes=0",
        "checkpoint.keep_every=0",
        "data.tokenizer.vocab_size=257",
        "data.val_fraction=0.5",
    ),
    "optimizer=sgd optimizer.momentum=0",
    "data.tokenizer.name=gpt2 data.tokenizer.vocab_size=1",  # the size of a trained BPE only
    "data=hf_dataset data.dataset=x data.val_split=test data.val_fraction=0",  # val_fraction unused then
]


@pytest.mark.parametrize("overrides", ACCEPTED)
def test_values_at_the_edges_of_their_ranges_compose(compose, overrides):
    compose(overrides.split())


def test_a_key_of_another_option_is_refused_as_such_not_by_range(compose):
    with pytest.raises(UserError, match=r"^optimizer.eps applies only to optimizer=adamw, not to optimizer=sgd"):
        compose(["optimizer=sgd", "optimizer.eps=-1"])


# -- the real CLI: one line, exit 2, nothing written ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed=-1 must be at least 0 and less than 4294967296"),
        ("model.dropout=1.5", "model.dropout=1.5 must be at least 0 and less than 1"),
        (
            "checkpoint.keep_last=0",
            "checkpoint.keep_last=0 must be -1 (keep all) or at least 1; set e.g. checkpoint.keep_last=1",
        ),
        (
            "checkpoint.every_steps=-3",
            "checkpoint.every_steps=-3 must be at least 0; set e.g. checkpoint.every_steps=0",
        ),
        (
            "optimizer.weight_decay=-0.1",
            "optimizer.weight_decay=-0.1 must be at least 0; set e.g. optimizer.weight_decay=0",
        ),
    ],
)
def test_the_cli_refuses_an_out_of_range_value_in_one_line_and_writes_nothing(tmp_path, override, message):
    result = run_cli("gpt2exp.train", *FAST, override, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {message}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_swept_out_of_range_value_fails_before_any_job(tmp_path):
    result = run_cli("gpt2exp.train", "-m", *FAST, "model.dropout=0.1,1.5", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: model.dropout=1.5 must be at least 0 and less than 1\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "error: argument --temperature: must be >= 0 (0: greedy), got -1"),
        (["--max-new-tokens", "-1"], "error: argument --max-new-tokens: must be >= 1, got -1"),
        (["--max-new-tokens", "0"], "error: argument --max-new-tokens: must be >= 1, got 0"),
        (["--top-k", "-1"], "error: argument --top-k: must be >= 0, got -1"),
        (["--num-samples", "0"], "error: argument --num-samples: must be >= 1, got 0"),
    ],
)
def test_generate_refuses_out_of_range_options_in_one_line(tmp_path, args, message):
    result = run_cli("gpt2exp.generate", str(tmp_path / "no-such-run"), *args, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")


def test_generate_takes_temperature_zero_as_greedy():
    from gpt2exp.generate import build_parser

    args = build_parser().parse_args(["PATH", "--temperature", "0", "--max-new-tokens", "1", "--top-k", "0"])
    assert (args.temperature, args.max_new_tokens, args.top_k) == (0.0, 1, 0)


# -- checkpoint.keep_last=-1 keeps every checkpoint ----------------------------------------------


def committed(root: Path, *steps: int) -> None:
    for step in steps:
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"files": {}, "metrics": {}}))


def keep(**kwargs):
    from omegaconf import OmegaConf

    base = {"keep_last": 2, "keep_best": 0, "keep_every": 0, "best_metric": "val/loss", "best_mode": "min"}
    return OmegaConf.create({**base, **kwargs})


def test_keep_last_minus_one_gives_every_checkpoint_the_reason_last(tmp_path):
    committed(tmp_path, 1, 2, 3, 4, 5)
    assert kept_reasons(tmp_path, keep(keep_last=-1)) == {f"step_{s:08d}": ["last"] for s in (1, 2, 3, 4, 5)}
    assert kept_reasons(tmp_path, keep(keep_last=-1, keep_every=2))["step_00000004"] == ["last", "milestone"]
    assert [name for name, why in kept_reasons(tmp_path, keep(keep_last=2)).items() if why] == [
        "step_00000004",
        "step_00000005",
    ]


@pytest.mark.slow
def test_a_run_with_keep_last_minus_one_keeps_every_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=6", "scheduler.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.keep_best=0"]
    result = run_cli("gpt2exp.train", *FAST, *args, "checkpoint.keep_last=-1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = {p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()}
    assert folders == {"step_00000002", "step_00000004", "step_00000006"}
