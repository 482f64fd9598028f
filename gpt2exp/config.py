"""Typed schemas for every config group, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `gpt2exp_schema` first in its defaults, so every YAML file and every
command-line override is checked against these dataclasses at compose time: a misspelled key or
`optimizer.lr=abc` fails there, naming the key. The YAML files carry one comment per key; the
dataclasses carry the types and the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt2exp.errors import UserError


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class OptimizerName(StrEnum):
    adamw = "adamw"
    sgd = "sgd"


class ScheduleName(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class LoggerBackend(StrEnum):
    wandb = "wandb"
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


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    init: str = "scratch"


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9
    fused: bool | None = None


@dataclass
class SchedulerConfig:
    name: ScheduleName = ScheduleName.cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None


@dataclass
class TokenizerConfig:
    name: str = "bpe"
    vocab_size: int = 4096


@dataclass
class DataConfig:
    source: str = "shakespeare"
    files: list[str] = field(default_factory=list)
    dataset: str | None = None
    config_name: str | None = None
    split: str = "train"
    val_split: str | None = None
    text_column: str = "text"
    val_fraction: float = 0.05
    cache_dir: str = "~/.cache/gpt2exp"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    every_minutes: float = 0.0
    save_final: bool = True
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str = "val/loss"
    best_mode: MetricMode = MetricMode.min
    keep_every: int = 0
    verify: VerifyMode = VerifyMode.sha256
    on_save_error: OnSaveError = OnSaveError.stop


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.wandb
    mode: WandbMode = WandbMode.offline
    project: str = "gpt2exp"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None


@dataclass
class TrainerConfig:
    max_steps: int = 600
    batch_size: int = 16
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    precision: Precision = Precision.fp32
    compile: bool = False
    grad_clip: float = 1.0
    num_threads: int | None = None
    sample_every: int = 0
    num_samples: int = 3
    sample_tokens: int = 200
    progress: bool = True


@dataclass
class Config:
    seed: int = 1337
    device: Device = Device.auto
    resume: str | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_schemas() -> None:
    ConfigStore.instance().store(name="gpt2exp_schema", node=Config)


def typed(cfg: Any) -> DictConfig:
    """Merge an untyped config (e.g. a `config.yaml` read back from disk) into the schema."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except Exception as exc:  # omegaconf raises several ValidationError kinds
        raise UserError(f"config does not match the schema: {str(exc).splitlines()[0]}") from exc
    OmegaConf.set_struct(merged, True)
    return merged


def validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express; each failure names the key and the fix."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{missing[0]} is required but not set; add {missing[0]}=... to the command")
    if cfg.data.source == "text_files" and not cfg.data.files:
        raise UserError("data.files is required for data=text_files; add data.files=[path/to/text.txt]")
    if cfg.data.source == "hf_dataset" and not cfg.data.dataset:
        raise UserError("data.dataset is required for data=hf_dataset; add data.dataset=<hub name or local path>")
    t = cfg.trainer
    for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "eval_batches", "num_samples"):
        value = t[key]
        if value < 1 and not (key in ("max_steps", "num_samples") and value == 0):
            raise UserError(f"trainer.{key}={value} must be at least 1; set e.g. trainer.{key}=1")
    m = cfg.model
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        if m[key] < 1:
            raise UserError(f"model.{key}={m[key]} must be at least 1")
    if m.init == "scratch" and m.n_embd % m.n_head:
        raise UserError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    if not 0.0 < cfg.data.val_fraction < 1.0 and cfg.data.val_split is None:
        raise UserError(f"data.val_fraction={cfg.data.val_fraction} must lie between 0 and 1")
    if cfg.optimizer.lr <= 0:
        raise UserError(f"optimizer.lr={cfg.optimizer.lr} must be positive")
