"""Typed schemas for every config group, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `gpt2exp_schema` first in its defaults, so every YAML file and every
command-line override is checked against these dataclasses at compose time: a misspelled key or
`optimizer.lr=abc` fails there, naming the key. The YAML files carry the values, one comment per
key; the dataclasses carry only the types.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from gpt2exp.errors import UserError


def _conf_dir() -> str:
    packaged = Path(__file__).resolve().parent / "conf"  # a wheel or a non-editable install
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf")


CONF_DIR = _conf_dir()  # the Hydra config tree: conf/ of the source tree, gpt2exp/conf/ once installed


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Activation(StrEnum):
    """The MLP's activation (transformers' names). gelu_new is OpenAI's GPT-2 tanh GELU as Python ops;
    gelu_pytorch_tanh is the same formula as one PyTorch kernel."""

    gelu_new = "gelu_new"
    gelu_pytorch_tanh = "gelu_pytorch_tanh"
    gelu = "gelu"  # exact (erf)
    gelu_fast = "gelu_fast"
    quick_gelu = "quick_gelu"
    relu = "relu"
    silu = "silu"


class OptimizerName(StrEnum):
    adamw = "adamw"
    sgd = "sgd"


class ScheduleName(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class LoggerBackend(StrEnum):
    wandb = "wandb"
    tensorboard = "tensorboard"
    wandb_tensorboard = "wandb_tensorboard"  # both: W&B's keys, and TensorBoard event files
    none = "none"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class VerifyMode(StrEnum):
    sha256 = "sha256"
    size = "size"


class OnSaveError(StrEnum):
    stop = "stop"
    warn = "warn"


class MetricMode(StrEnum):
    min = "min"
    max = "max"


class Strategy(StrEnum):
    auto = "auto"  # one process, or DDP when torchrun starts several
    ddp = "ddp"
    fsdp = "fsdp"


class Backend(StrEnum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


# Every value comes from the YAML files under conf/ (the one source of defaults, each key with its
# comment there); the dataclasses give types. `MISSING` marks a key that every option of its group
# sets; a key that only some options use defaults to its "unset" value (None or []), and
# `check_applicable` refuses it set under an option that does not use it.


@dataclass
class ModelConfig:
    n_layer: int = MISSING
    n_head: int = MISSING
    n_embd: int = MISSING
    block_size: int = MISSING
    dropout: float = MISSING
    init: str = MISSING
    vocab_multiple: int = MISSING
    activation: Activation = MISSING


@dataclass
class OptimizerConfig:
    name: OptimizerName = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] | None = None  # adamw
    eps: float | None = None  # adamw
    fused: bool | None = None  # adamw; None also means "choose by device"
    momentum: float | None = None  # sgd


@dataclass
class SchedulerConfig:
    name: ScheduleName = MISSING
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING
    decay_steps: int | None = None


class Holdout(StrEnum):
    documents = "documents"  # whole documents spread through the corpus (one text file: its last part)
    tail = "tail"  # gpt2exp 0.1: the last val_fraction of the characters, cut at a line boundary


@dataclass
class TokenizerConfig:
    name: str = MISSING
    vocab_size: int = MISSING


@dataclass
class DataConfig:
    source: str = MISSING
    val_fraction: float = MISSING
    holdout: Holdout = MISSING
    cache_dir: str = MISSING
    num_proc: int | None = MISSING
    shard_tokens: int = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    files: list[str] = field(default_factory=list)  # text_files
    dataset: str | None = None  # hf_dataset
    config_name: str | None = None  # hf_dataset
    split: str | None = None  # hf_dataset
    val_split: str | None = None  # hf_dataset
    text_column: str | None = None  # hf_dataset


@dataclass
class CheckpointConfig:
    every_steps: int = MISSING
    every_minutes: float = MISSING
    save_final: bool = MISSING
    keep_last: int = MISSING
    keep_best: int = MISSING
    best_metric: str = MISSING
    best_mode: MetricMode = MISSING
    keep_every: int = MISSING
    verify: VerifyMode = MISSING
    on_save_error: OnSaveError = MISSING
    async_save: bool = MISSING
    dir: str | None = None  # every option: None keeps the checkpoints in the run dir


@dataclass
class LoggerConfig:
    backend: LoggerBackend = MISSING
    group: str | None = None  # any backend: also labels the run in reports
    name: str | None = None  # any backend
    mode: WandbMode | None = None  # wandb, wandb_tensorboard
    project: str | None = None  # wandb, wandb_tensorboard
    entity: str | None = None  # wandb, wandb_tensorboard
    tags: list[str] = field(default_factory=list)  # wandb, wandb_tensorboard


@dataclass
class TrainerConfig:
    max_steps: int = MISSING
    batch_size: int = MISSING
    grad_accum_steps: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_batches: int = MISSING
    precision: Precision = MISSING
    compile: bool = MISSING
    grad_clip: float = MISSING
    num_threads: int | None = None
    sample_every: int = MISSING
    num_samples: int = MISSING
    sample_tokens: int = MISSING
    progress: bool = MISSING
    early_stop_patience: int = MISSING
    early_stop_min_delta: float = MISSING
    deterministic: bool = MISSING


@dataclass
class DistributedConfig:
    strategy: Strategy = MISSING
    backend: Backend = MISSING


@dataclass
class TrialConfig:
    """Set by the Optuna sweeper (hydra/sweeper=gpt2exp_optuna) for each trial of a study; unset outside one."""

    number: int | None = None
    study: str | None = None
    storage: str | None = None


@dataclass
class Config:
    seed: int = MISSING
    device: Device = MISSING
    resume: str | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# Keys that only some options of a group use: key -> (the key naming the option, its group, the options).
ONLY_FOR: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "data.files": ("data.source", "data", ("text_files",)),
    **{f"data.{k}": ("data.source", "data", ("hf_dataset",)) for k in ("dataset", "config_name", "split")},
    **{f"data.{k}": ("data.source", "data", ("hf_dataset",)) for k in ("val_split", "text_column")},
    **{f"optimizer.{k}": ("optimizer.name", "optimizer", ("adamw",)) for k in ("betas", "eps", "fused")},
    "optimizer.momentum": ("optimizer.name", "optimizer", ("sgd",)),
    **{
        f"logger.{k}": ("logger.backend", "logger", ("wandb", "wandb_tensorboard"))
        for k in ("mode", "project", "entity", "tags")
    },
}


# The key each group's option files set to name the option: unset only when no option was chosen.
CHOSEN_BY_OPTION = ("data.source", "optimizer.name", "scheduler.name", "logger.backend")


def check_applicable(cfg: DictConfig, keys: Collection[str] | None = None) -> None:
    """A key set for an option other than the chosen one is refused, naming the option that has it.

    Run on freshly composed configs, or with `keys`, on those alone (a resume's overrides against the
    record's options): a config of record from before this check may carry such keys with the values
    the option files then listed.
    """
    for key, (chooser, group, options) in ONLY_FOR.items():
        if keys is not None and key not in keys:
            continue
        value = OmegaConf.select(cfg, key)
        chosen = str(OmegaConf.select(cfg, chooser))
        if value not in (None, []) and chosen not in options:
            choices = " or ".join(f"{group}={option}" for option in options)
            raise UserError(f"{key} applies only to {choices}, not to {group}={chosen}; did you mean {choices}?")


def register_schemas() -> None:
    ConfigStore.instance().store(name="gpt2exp_schema", node=Config)


# Keys the Trainer rewrites in the config of record to what actually ran (trainer.config_as_run): a
# requeued command that asks for what its first launch asked is no change.
RECORDED_AS_RUN = (
    "trainer.precision",
    "trainer.compile",
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "model.vocab_multiple",
    "model.activation",
)


def requested_values(cfg: DictConfig) -> dict[str, Any]:
    """What a first launch asked of the RECORDED_AS_RUN keys, before the Trainer records what ran
    (run.json `requested`): the command requeued asks the same, which is no change."""
    values = {key: OmegaConf.select(cfg, key) for key in RECORDED_AS_RUN}
    return {key: value.value if isinstance(value, Enum) else value for key, value in values.items()}


# Keys added after a config of record could have been written, with the value that reproduces what
# such a run did (its config.yaml lacks them).
ADDED_KEYS: dict[str, Any] = {
    "checkpoint.async_save": False,
    "checkpoint.dir": None,  # checkpoints in <run dir>/checkpoints
    "trainer.early_stop_patience": 0,  # early stopping off
    "trainer.early_stop_min_delta": 0.0,
    "distributed.strategy": "auto",  # one process
    "distributed.backend": "auto",
    "trial.number": None,  # not a trial of an Optuna study
    "trial.study": None,
    "trial.storage": None,
    "data.holdout": "tail",  # 0.1 held out the last val_fraction of the characters
    "data.num_proc": None,  # changes no token
    "data.shard_tokens": 100_000_000,  # the windows of a token stream do not depend on its shards
    "model.vocab_multiple": 1,  # the embedding had exactly the tokenizer's rows
    "model.activation": "gelu_new",  # transformers' GPT-2 default
    "trainer.deterministic": False,
}


def is_missing(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted `key` holds `???` (OmegaConf.is_missing takes only a direct child)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return node is not None and OmegaConf.is_missing(node, leaf)


def typed(cfg: Any) -> DictConfig:
    """Merge an untyped config (e.g. a `config.yaml` read back from disk) into the schema."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except Exception as exc:  # omegaconf raises several ValidationError kinds
        raise UserError(f"config does not match the schema: {str(exc).splitlines()[0]}") from exc
    for key, value in ADDED_KEYS.items():
        if is_missing(merged, key):
            OmegaConf.update(merged, key, value)
    OmegaConf.set_struct(merged, True)
    return merged


CHECKPOINT_METRICS = ("val/loss",)  # what a checkpoint's manifest holds of the evaluation at its step


def validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express; each failure names the key and the fix."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        unchosen = [key for key in missing if key in CHOSEN_BY_OPTION]
        if unchosen:  # the group's option was removed (`~logger`), not just a key
            group = unchosen[0].split(".")[0]
            options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
            raise UserError(f"no {group} option is chosen; choose one with {group}=..., one of {', '.join(options)}")
        raise UserError(f"{missing[0]} is required but not set; add {missing[0]}=... to the command")
    if cfg.data.source == "text_files" and not cfg.data.files:
        raise UserError("data.files is required for data=text_files; add data.files=[path/to/text.txt]")
    if cfg.data.source == "hf_dataset" and not cfg.data.dataset:
        raise UserError("data.dataset is required for data=hf_dataset; add data.dataset=<hub name or local path>")
    check_ranges(cfg)
    if cfg.checkpoint.best_metric not in CHECKPOINT_METRICS:
        raise UserError(
            f"checkpoint.best_metric={cfg.checkpoint.best_metric} is not a metric a checkpoint records; "
            f"use {' or '.join(CHECKPOINT_METRICS)}"
        )
    m = cfg.model
    if m.init == "scratch" and m.n_embd % m.n_head:
        raise UserError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")


# -- ranges ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: an interval (each bound included unless marked open), plus
    special values with their meaning, e.g. `(-1, "keep all")`. A list key (`count` set) holds that
    many values, each in the interval. The YAML comment of the key states `notation()`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple[tuple[Any, str], ...] = ()
    count: int | None = None
    why: str = ""  # said after the range in an error, e.g. why the bound is what it is
    when: Callable[[Any], bool] | None = field(default=None, compare=False)  # only where the key is used

    def admits(self, value: Any) -> bool:
        if any(value is None if v is None else value == v for v, _ in self.special):
            return True
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def words(self) -> str:
        """`at least 1`, `-1 (keep all) or at least 1`, `at least 0 and less than 1`, ..."""
        bounds = []
        if self.low is not None:
            bounds.append(f"{'greater than' if self.low_open else 'at least'} {self.low}")
        if self.high is not None:
            bounds.append(f"{'less than' if self.high_open else 'at most'} {self.high}")
        specials = [f"{_yaml_value(v)} ({meaning})" for v, meaning in self.special]
        return " or ".join([*specials, " and ".join(bounds)])

    def notation(self) -> str:
        """As the YAML comments write it: `>= 1`, `> 0`, `[0, 1)`, `null or >= 1`, `-1 or >= 1`."""
        if self.low is not None and self.high is not None:
            interval = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            interval = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            interval = f"{'<' if self.high_open else '<='} {self.high}"
        return " or ".join([*(_yaml_value(v) for v, _ in self.special), interval])

    def refusal(self, key: str, value: Any) -> str | None:
        """The one-line error for `key=value`, or None if the value is in range."""
        if self.count is not None:
            values = list(value) if isinstance(value, ListConfig | list) else None
            if values is None or len(values) != self.count or not all(self.admits(v) for v in values):
                shown = values if values is not None else _yaml_value(value)
                return f"{key}={shown} must hold {self.count} numbers, each {self.words()}"
            return None
        if self.admits(value):
            return None
        finite = "" if not isinstance(value, float) or math.isfinite(value) else "a finite number "
        example = f"; set e.g. {key}={self.low}" if self.low is not None and not self.low_open else ""
        why = f" ({self.why})" if self.why else ""
        return f"{key}={_yaml_value(value)} must be {finite}{self.words()}{why}{example if self.high is None else ''}"


def _yaml_value(value: Any) -> str:
    return "null" if value is None else str(value)


def _bpe(cfg: Any) -> bool:
    return cfg.data.tokenizer.name == "bpe"


def _no_val_split(cfg: Any) -> bool:
    return cfg.data.val_split is None


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(low=0), Range(low=1), Range(low=0, low_open=True)
SEED_LIMIT = 2**32  # seeds are below it: numpy's legacy seeding takes no more, and torch's stays clear of overflow
FRACTION = Range(low=0, high=1, high_open=True)  # 0 <= x < 1

# The documented range of every numeric key (conf/ comments state each one; tests/test_ranges.py
# checks that they agree and that no numeric key of the schema is missing here).
RANGES: dict[str, Range] = {
    "seed": Range(low=0, high=SEED_LIMIT, high_open=True),
    **{f"trainer.{k}": AT_LEAST_0 for k in ("max_steps", "eval_every", "sample_every", "num_samples", "grad_clip")},
    **{f"trainer.{k}": AT_LEAST_1 for k in ("batch_size", "grad_accum_steps", "log_every", "eval_batches")},
    "trainer.sample_tokens": AT_LEAST_1,
    **{f"trainer.{k}": AT_LEAST_0 for k in ("early_stop_patience", "early_stop_min_delta")},
    "trainer.num_threads": Range(low=1, special=((None, "torch's default"),)),
    **{f"model.{k}": AT_LEAST_1 for k in ("n_layer", "n_head", "n_embd", "block_size")},
    "model.dropout": FRACTION,
    "model.vocab_multiple": AT_LEAST_1,
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": AT_LEAST_0,
    "optimizer.betas": Range(low=0, high=1, high_open=True, count=2),
    "optimizer.eps": POSITIVE,
    "optimizer.momentum": FRACTION,
    "scheduler.warmup_steps": AT_LEAST_0,
    "scheduler.min_lr_ratio": Range(low=0, high=1),
    "scheduler.decay_steps": Range(low=0, special=((None, "trainer.max_steps"),)),  # 0: the record of max_steps=0
    "data.val_fraction": Range(low=0, high=1, low_open=True, high_open=True, when=_no_val_split),
    "data.num_proc": Range(low=1, special=((None, "the available cores"),)),
    "data.shard_tokens": Range(low=1),
    "data.tokenizer.vocab_size": Range(low=257, why="the 256 bytes and the end-of-text token", when=_bpe),
    "checkpoint.every_steps": AT_LEAST_0,
    "checkpoint.every_minutes": AT_LEAST_0,
    "checkpoint.keep_last": Range(low=1, special=((-1, "keep all"),)),
    "checkpoint.keep_best": AT_LEAST_0,
    "checkpoint.keep_every": AT_LEAST_0,
    "trial.number": Range(low=0, special=((None, "not a trial"),)),
}


def check_ranges(cfg: DictConfig) -> None:
    """Refuse the first value outside its key's documented range, naming key, value and range.

    A key of an option other than the chosen one is left to `check_applicable`.
    """
    for key, allowed in RANGES.items():
        if key in ONLY_FOR and not _chosen(cfg, key):
            continue
        if allowed.when is not None and not allowed.when(cfg):
            continue
        refusal = allowed.refusal(key, OmegaConf.select(cfg, key))
        if refusal:
            raise UserError(refusal)


def _chosen(cfg: DictConfig, key: str) -> bool:
    chooser, _, options = ONLY_FOR[key]
    return str(OmegaConf.select(cfg, chooser)) in options
