"""The Trainer: everything built in `__init__`, and a run loop that reads as the phases of training.

    trainer = Trainer(cfg, run_dir)          # data, model, optimizer, schedule, sampler, checkpoints, logger
    val_loss = trainer.run(resume_from)      # fresh start or resume, the loop, the end; run.json's status
    loss = trainer.step()                    # one optimizer step (what the benchmarks time)

The loop (`train`) is its own table of contents: one optimizer step, then each periodic phase
(evaluate, log, sample, save) and each stop condition (divergence, a preemption signal), each a
short method that decides for itself whether it is due. The end of `max_steps` ends the loop, and
so does early stopping (`stop_if_not_improving`: val/loss no better for trainer.early_stop_patience
evaluations in a row).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpt2exp.config import Activation, requested_values
from gpt2exp.distributed import gradient_sync, sum_over_ranks
from gpt2exp.errors import Diverged, RunStopped, SaveFailed, UserError
from gpt2exp.mfu import flops_per_token, mfu, peak_flops
from gpt2exp.preemption import EXIT_PREEMPTED, PreemptionFlag
from gpt2exp.pruning import TrialLink, TrialPruned
from gpt2exp.resume import ResumeTarget, config_digest
from gpt2exp.rundir import (
    RunStatus,
    code_version,
    new_run_id,
    read_run_json,
    start_run_json,
    timestamp,
    update_run_json,
    write_config_of_record,
)

log = logging.getLogger("gpt2exp")


class Preempted(Exception):
    """The run stopped on a signal after saving; the process should exit with EXIT_PREEMPTED."""

    def __init__(self, flag: PreemptionFlag):
        super().__init__(flag.signal_name)
        self.flag = flag


def next_token_loss(model, inputs, targets):
    """Mean cross-entropy of `targets` (already shifted by one) under the model's logits for `inputs`."""
    import torch.nn.functional as F

    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def loss_function(model, strategy: str, compile_it: bool):
    """`loss_of(inputs, targets)`: `next_token_loss` of `model`, compiled when asked.

    One process compiles the loss together with the model, so inductor fuses the fp32 cross-entropy
    over the logits (the largest tensors of a step) into few kernels. A DDP or FSDP wrapper is
    compiled alone, as torch.distributed documents it: dynamo does not trace DDP's forward from inside
    a compiled function (it skips `_inside_ddp_forward` and breaks the graph there).
    """
    import torch

    if not compile_it:
        return functools.partial(next_token_loss, model)
    if strategy == "single":
        return functools.partial(torch.compile(next_token_loss), model)
    return functools.partial(next_token_loss, torch.compile(model))


def pick_device(name: str, local_rank: int = 0):
    """The device `name` asks for; a CUDA one is this process's GPU on its node (torchrun's LOCAL_RANK)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but MPS is not available; use device=auto or device=cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def use_tf32(device) -> None:
    """On CUDA, TF32 tensor cores for the matmuls autocast leaves in fp32 (training and evaluation alike)."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def use_deterministic(on: bool) -> None:
    """trainer.deterministic: only kernels that give the same bits every time (an op without one
    raises), so on CUDA two runs and a resumed run are bit-identical. Without it, the atomic adds of
    some backward kernels (flash attention's among them) sum in a different order each run. Set before the
    first cuBLAS call (its workspace setting) and before torch.compile (inductor reads it)."""
    import torch

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


def autocast_context(device, precision: str):
    import torch

    if precision == "fp32" or (precision == "fp16" and device.type == "cpu"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def config_as_run(cfg: DictConfig, device_type: str, model_config: Any) -> DictConfig:
    """A copy of `cfg` holding what actually runs on `device_type` with the built model, each change logged.

    fp16 autocast runs on accelerators only and torch.compile on CUDA only: elsewhere the run trains
    in fp32 / uncompiled and the config of record says so. A pretrained model (model.init) has its own
    shape, vocabulary and activation, which replace the preset's. A warm-up longer than the run is
    said too (the LR never peaks), and so is early stopping without periodic evaluations (it cannot
    trigger).
    On resume the record already holds these values, so nothing changes (a requeued original command
    is checked against the first launch's values: resume.forbidden_changes).
    """
    import copy

    cfg = copy.deepcopy(cfg)
    t, m = cfg.trainer, cfg.model
    if t.precision == "fp16" and device_type == "cpu":
        log.warning("trainer.precision=fp16 is not used on cpu: training in fp32 (config.yaml records fp32)")
        t.precision = "fp32"
    if t.compile and device_type != "cuda":
        log.warning("trainer.compile=true is not used on %s: running uncompiled (recorded as false)", device_type)
        t.compile = False
    if m.init != "scratch":
        shape = {key: getattr(model_config, key) for key in ("n_layer", "n_head", "n_embd")}
        changed = {key: value for key, value in shape.items() if m[key] != value}
        if changed:
            said = _pairs({key: m[key] for key in changed})
            log.info(
                "model.init=%s is %s: config.yaml records that shape (the config said %s)", m.init, _pairs(shape), said
            )
            for key, value in changed.items():
                m[key] = value
        if m.vocab_multiple != 1:  # the pretrained embedding is used as it is
            log.info("model.init=%s keeps its own vocabulary: config.yaml records model.vocab_multiple=1", m.init)
            m.vocab_multiple = 1
        own = model_config.activation_function
        if m.activation != own and own in Activation.__members__:
            log.info("model.init=%s keeps its own activation: config.yaml records model.activation=%s", m.init, own)
            m.activation = own
    warmup = cfg.scheduler.warmup_steps
    if t.max_steps and warmup > t.max_steps:
        log.warning(
            "scheduler.warmup_steps=%d is more than trainer.max_steps=%d: the LR stays in warm-up and never "
            "reaches optimizer.lr; lower scheduler.warmup_steps to train at the full LR",
            warmup,
            t.max_steps,
        )
    if t.early_stop_patience and not t.eval_every:
        log.warning(
            "trainer.early_stop_patience=%d counts evaluations, but trainer.eval_every=0 evaluates only at the "
            "end: early stopping cannot stop this run; set trainer.eval_every",
            t.early_stop_patience,
        )
    return cfg


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


class StepClock:
    """Tokens per second of the training steps alone: evaluation, samples and saves are left out."""

    def __init__(self) -> None:
        self.seconds, self.tokens = 0.0, 0

    @contextlib.contextmanager
    def timing(self, tokens: int):
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start
        self.tokens += tokens

    def take_rate(self) -> float:
        """The rate since the last call, and start a new window."""
        rate = self.tokens / max(self.seconds, 1e-9)
        self.seconds, self.tokens = 0.0, 0
        return rate


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, tokenizer_of_run: Path | None = None):
        """`tokenizer_of_run`: a resumed run's own tokenizer, which the data cache's must equal in token ids."""
        import torch
        from tqdm import tqdm

        from gpt2exp.checkpoint import CheckpointManager
        from gpt2exp.checkpoint_sharded import ShardedCheckpointFiles
        from gpt2exp.data import BatchSampler, prepare_data, val_batches
        from gpt2exp.distributed import strategy_of, world_from_env, wrap_model
        from gpt2exp.model import build_model, count_parameters
        from gpt2exp.optim import LRSchedule, build_optimizer
        from gpt2exp.state import RngState, TensorState, TrainerCounters, seed_everything
        from gpt2exp.tracking import SilentTracker, Tracker

        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.trainer
        torch.set_num_threads(t.num_threads)
        seed_everything(cfg.seed)
        self.world = world_from_env()
        self.strategy = strategy_of(cfg.distributed, self.world)  # single, ddp or fsdp
        self.device = pick_device(cfg.device, self.world.local_rank)
        use_tf32(self.device)
        use_deterministic(t.deterministic)
        self.data = prepare_data(cfg.data, tokenizer_of_run)
        self.model = build_model(cfg.model, self.data.vocab_size, self.data.tokenizer.eos_token_id).to(self.device)
        log.info("model: %.2fM parameters, vocab %d", count_parameters(self.model) / 1e6, self.data.vocab_size)
        self.data.state_context_length(self.model.config.n_positions)  # the tokenizer files say the model's
        self.requested = requested_values(cfg)
        cfg = self.cfg = config_as_run(cfg, self.device.type, self.model.config)  # what is recorded is what runs
        t = cfg.trainer
        if self.world.rank:  # every rank built the same weights; from here each draws its own dropout
            torch.manual_seed(cfg.seed + self.world.rank)
        self.wrapped = wrap_model(self.model, self.strategy, self.device)  # DDP's wrapper; FSDP2 shards in place
        self.optimizer = build_optimizer(cfg.optimizer, self.model, self.device.type)
        self.schedule = LRSchedule(self.optimizer, cfg.optimizer.lr, cfg.scheduler)
        use_scaler = t.precision == "fp16" and self.device.type == "cuda"
        if self.strategy == "fsdp":  # fp16 over sharded gradients: the inf check is agreed by every rank
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.device.type, enabled=use_scaler)
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.sampler = BatchSampler(self.data.train, cfg.model.block_size, t.batch_size, cfg.seed)
        self.val = val_batches(self.data.val, cfg.model.block_size, t.batch_size, t.eval_batches)
        self.counters = TrainerCounters()
        self.stateful: dict[str, Any] = {
            "model": self.model,
            "optimizer": TensorState(self.optimizer),
            "scaler": TensorState(self.scaler) if use_scaler else None,
            "schedule": self.schedule,
            "sampler": self.sampler,
            "trainer": self.counters,
            "rng": RngState(),
        }
        identity = {"config_sha256": config_digest(cfg), "code_version": code_version()}
        if self.strategy == "single":
            self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, self.data.tokenizer_dir, identity)
        else:
            files = ShardedCheckpointFiles(self.data.tokenizer_dir, self.world.rank)
            self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, None, identity, files, self.world)
        self.tracker = Tracker(cfg.logger, self.run_dir) if self.world.main else SilentTracker()
        self.loss_of = loss_function(self.wrapped, self.strategy, t.compile)
        self.autocast = autocast_context(self.device, t.precision)
        self.tokens_per_step = t.batch_size * t.grad_accum_steps * cfg.model.block_size
        self.flops_per_token = flops_per_token(self.model, cfg.model.block_size)
        self.peak_flops = peak_flops(self.device)  # None on a CPU or an unknown GPU: no mfu is logged
        self.clock = StepClock()
        self.preemption = PreemptionFlag()
        self.trial = TrialLink.from_config(cfg.trial, self.run_dir, t.max_steps)  # an Optuna trial's study (pruning)
        self.rows_per_rank = t.batch_size * t.grad_accum_steps // self.world.size  # launch.check_world: divides
        show = t.progress and self.world.main
        self.bar = tqdm(total=t.max_steps, disable=not show, dynamic_ncols=True, leave=False, delay=0.5)
        self.lr = 0.0  # the LR of the newest step
        self.snapshot_reserved = False  # a background save's buffers, made once the optimizer has its state

    # -- the run: start, loop, end -----------------------------------------------------------------

    def run(self, resume_from: ResumeTarget | None) -> float:
        """Train (or continue) to trainer.max_steps, or until early stopping; returns the final validation loss.

        run.json says how it ended whatever fails, W&B start and the first evaluation included. The
        preemption flag is installed throughout: a signal at any moment ends the run at the next
        boundary between phases (saved if it trained since its last checkpoint, `preempted`, exit 75).
        """
        with self.preemption:
            if resume_from is None:
                rewind_to = self.start_fresh()
            elif resume_from.restart:
                rewind_to = self.restart()
            else:
                rewind_to = self.resume(resume_from.checkpoint)
            status, exit_code = RunStatus.failed, 1
            try:
                self.stop_if_asked()
                config = OmegaConf.to_container(self.cfg, resolve=True)
                self.tracker.start_wandb(self.counters.wandb_id, config, rewind_to)
                self.stop_if_asked()
                val_loss = self.train()
                status, exit_code = RunStatus.early_stopped if self.early_stop_due() else RunStatus.completed, 0
                return val_loss
            except Preempted:
                status, exit_code = RunStatus.preempted, EXIT_PREEMPTED
                raise
            except TrialPruned as pruned:  # saved; the study goes on with its next trial
                status, exit_code = RunStatus.pruned, 0
                return pruned.value
            except Diverged:
                status = RunStatus.diverged  # final: a rerun would diverge again, bit for bit
                raise
            except RunStopped as exc:
                exit_code = exc.exit_code
                raise
            finally:
                self.bar.close()
                self.tracker.finish(exit_code)
                self.checkpoints.close()
                if self.world.main:
                    update_run_json(self.run_dir, status=status, ended_at=timestamp(), step=self.counters.step)

    def start_fresh(self) -> None:
        """Write the config of record, run.json and the tokenizer; no W&B step to rewind to."""
        from gpt2exp.distributed import rank0_decides
        from gpt2exp.tracking import truncate_metrics

        def record() -> dict[str, Any]:
            write_config_of_record(self.run_dir, self.cfg)
            info = start_run_json(self.run_dir, parent=None, world=self.world_record(), requested=self.requested)
            shutil.copytree(self.data.tokenizer_dir, self.run_dir / "tokenizer", dirs_exist_ok=True)
            truncate_metrics(self.run_dir, -1)  # a fresh start in a dir whose earlier attempt never checkpointed
            return info

        self.counters.wandb_id = rank0_decides(record)["wandb_id"]

    def restart(self) -> None:
        """A run that never saved a checkpoint starts again at step 0 from its config of record, in its
        dir: the attempt's metrics rows are dropped, run.json records the restart, W&B starts a new run."""
        from gpt2exp.distributed import rank0_decides
        from gpt2exp.tracking import truncate_metrics

        def record() -> tuple[dict[str, Any], int]:
            info = read_run_json(self.run_dir)
            dropped = truncate_metrics(self.run_dir, -1)
            restart = {"at": timestamp(), "wandb_id": info.get("wandb_id"), **self.world_record()}
            restarts = info.get("restarts", []) + [restart]
            info = update_run_json(self.run_dir, status=RunStatus.running, wandb_id=new_run_id(), restarts=restarts)
            shutil.rmtree(self.run_dir / "tokenizer", ignore_errors=True)  # no file of the attempt's tokenizer stays
            shutil.copytree(self.data.tokenizer_dir, self.run_dir / "tokenizer")
            return info, dropped

        info, dropped = rank0_decides(record)
        self.counters.wandb_id = info["wandb_id"]
        log.info(
            "run %s has no checkpoint: restarting it from step 0 with its config of record%s",
            self.run_dir,
            f"; dropped the {dropped} metrics rows of the attempt before" if dropped else "",
        )

    def resume(self, checkpoint: Path | None) -> int:
        """Load `checkpoint` (None: the newest good one) into every stateful object; returns its step."""
        from gpt2exp.distributed import rank0_decides
        from gpt2exp.tracking import truncate_metrics

        loaded = self.checkpoints.load(self.stateful, checkpoint)
        if loaded.trainer_state.get("config_sha256") != config_digest(self.cfg):
            log.warning("%s was saved under another config than this run's config.yaml", loaded.path.name)

        def record() -> tuple[dict[str, Any], int]:
            info = read_run_json(self.run_dir)
            dropped = truncate_metrics(self.run_dir, loaded.step)
            resume = {"step": loaded.step, "at": timestamp(), **self.world_record(), "retention": self.retention()}
            update_run_json(self.run_dir, status=RunStatus.running, resumes=info.get("resumes", []) + [resume])
            return info, dropped

        info, dropped = rank0_decides(record)
        log.info(
            "resumed from step %d of run %s (W&B id %s)%s",
            loaded.step,
            info.get("run_id"),
            self.counters.wandb_id,
            f"; dropped {dropped} metrics rows logged after it" if dropped else "",
        )
        self.bar.set_description(f"resumed at {loaded.step}")
        self.bar.update(loaded.step)
        return loaded.step

    def retention(self) -> dict[str, Any]:
        """The checkpoint.* settings this launch rotates by (run.json: each resume's, which `ckpt list` shows)."""
        from omegaconf import OmegaConf

        from gpt2exp.checkpoint import RETENTION_KEYS

        settings = OmegaConf.to_container(self.cfg.checkpoint, enum_to_str=True)
        return {key: settings[key] for key in RETENTION_KEYS}

    def world_record(self) -> dict[str, Any]:
        """How many processes this launch trains on, and how (run.json: the first launch and each resume)."""
        return {"world_size": self.world.size, "strategy": self.strategy}

    def train(self) -> float:
        """The loop: one line per phase. A run resumed where it should stop early trains no further step."""
        if self.counters.step == 0:
            self.evaluate_if_due()  # the starting point of the validation curve
            self.log_if_due(None)
            self.stop_if_asked()
        while self.counters.step < self.cfg.trainer.max_steps and not self.early_stop_due():
            loss = self.step()
            self.stop_if_diverged(loss)
            self.evaluate_if_due()
            pruned = self.prune_due()  # before a signal stops the run: the study gets this step's val/loss
            self.log_if_due(loss, last=pruned)
            self.sample_if_due()
            self.save_if_due()
            if pruned:
                self.stop_pruned()
            self.stop_if_asked()
            self.stop_if_not_improving()
        return self.finish()

    # -- one optimizer step ------------------------------------------------------------------------

    def step(self) -> float:
        """One optimizer step over trainer.grad_accum_steps micro-batches; returns the mean loss."""
        import torch

        t, c = self.cfg.trainer, self.counters
        with self.clock.timing(self.tokens_per_step):
            self.lr = self.schedule.apply(c.step)
            self.model.train()
            total = torch.zeros((), device=self.device)
            micro_batches = self.my_micro_batches()
            for i, (x, y, weight) in enumerate(micro_batches):
                x, y = self.to_device(x), self.to_device(y)
                with gradient_sync(self.wrapped, self.model, self.strategy, i == len(micro_batches) - 1):
                    with self.autocast:
                        loss = self.loss_of(x, y)
                        loss = loss / weight if isinstance(weight, int) else loss * weight
                    self.scaler.scale(loss).backward()
                total += loss.detach()
            if t.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.checkpoints.wait_snapshot()  # a background save's copy of the weights must be done first
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            loss_value = total.item()  # one device sync per step, not per micro-batch
            if self.world.size > 1:  # the mean over the ranks: each trained on as many sequences
                loss_value = sum_over_ranks([loss_value])[0] / self.world.size
        # a background save's buffers, once the optimizer has made its state (a step fp16's scaler skips
        # makes none); outside the step's timing
        if not self.snapshot_reserved and self.optimizer.state:
            self.checkpoints.reserve_snapshot(self.stateful)
            self.snapshot_reserved = True
        c.step += 1
        c.tokens_seen += self.tokens_per_step
        self.bar.update(1)
        return loss_value

    def my_micro_batches(self) -> list[tuple[Any, Any, int | float]]:
        """This rank's share of the step's global batch, as micro-batches of at most trainer.batch_size
        sequences, each with what its mean loss is divided by (an int: the count of equal micro-batches)
        or multiplied with (its share of the rank's sequences).

        Every rank draws the whole global batch (trainer.grad_accum_steps draws of trainer.batch_size
        windows) and keeps its consecutive slice of rows: step k trains on the same sequences on any
        number of processes, and one process trains exactly as before, micro-batch by micro-batch.
        """
        import numpy as np

        t = self.cfg.trainer
        draws = [self.sampler.next_batch() for _ in range(t.grad_accum_steps)]
        if self.world.size == 1:
            return [(x, y, t.grad_accum_steps) for x, y in draws]
        rows = slice(self.world.rank * self.rows_per_rank, (self.world.rank + 1) * self.rows_per_rank)
        x = np.concatenate([d[0] for d in draws])[rows]
        y = np.concatenate([d[1] for d in draws])[rows]
        count = -(-self.rows_per_rank // t.batch_size)
        pieces = list(zip(np.array_split(x, count), np.array_split(y, count), strict=True))
        if len({len(px) for px, _ in pieces}) == 1:
            return [(px, py, count) for px, py in pieces]
        return [(px, py, len(px) / self.rows_per_rank) for px, py in pieces]

    def to_device(self, array):
        """A host batch on the device: through pinned memory and a non-blocking copy on CUDA."""
        import torch

        batch = torch.from_numpy(array)
        return batch.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else batch

    # -- periodic work -----------------------------------------------------------------------------

    def evaluate_if_due(self) -> None:
        c, t = self.counters, self.cfg.trainer
        if not ((t.eval_every and c.step % t.eval_every == 0) or c.step == t.max_steps):
            return
        c.last_eval = {"val/loss": self.evaluate(), "step": c.step}
        c.record_eval(c.last_eval["val/loss"], t.early_stop_min_delta)

    def evaluate(self) -> float:
        import torch

        self.model.eval()
        losses = []
        with torch.no_grad(), self.autocast:
            for x, y in self.my_val_batches():
                x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
                losses.append(next_token_loss(self.model, x, y).item())
        if self.world.size == 1:
            return float(sum(losses) / len(losses))
        # the mean over every rank's batches; a rank's padding batch (FSDP needs as many forwards on
        # every rank) is not counted
        own = losses[: len(self.val[self.world.rank :: self.world.size])]
        total, count = sum_over_ranks([sum(own), float(len(own))])
        return float(total / count)

    def my_val_batches(self) -> list[tuple[Any, Any]]:
        """The validation batches this rank evaluates: every world-size-th, padded to as many on every rank."""
        if self.world.size == 1:
            return self.val
        mine = self.val[self.world.rank :: self.world.size]
        per_rank = -(-len(self.val) // self.world.size)
        return mine + [self.val[0]] * (per_rank - len(mine))

    def log_if_due(self, loss: float | None, last: bool = False) -> None:
        """This step's row: train metrics every log_every steps and at the end (max_steps, an early stop
        or a pruned trial's `last` step), val/loss when evaluated now. tokens_per_s is the whole world's;
        mfu is each device's."""
        c, t = self.counters, self.cfg.trainer
        row: dict[str, float] = {}
        end = c.step == t.max_steps or self.early_stop_due() or last
        if loss is not None and (c.step % t.log_every == 0 or end):
            tokens_per_s = self.clock.take_rate()
            row = {"train/loss": loss, "lr": self.lr, "tokens_per_s": tokens_per_s, "tokens": c.tokens_seen}
            if self.peak_flops is not None:  # each device runs 1/world.size of the tokens, against its own peak
                row["mfu"] = mfu(tokens_per_s / self.world.size, self.flops_per_token, self.peak_flops)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if c.last_eval.get("step") == c.step:  # evaluated at this step
            row["val/loss"] = c.last_eval["val/loss"]
            train_loss = f"train/loss {loss:.4f} " if loss is not None else ""
            log.info("step %d: %sval/loss %.4f", c.step, train_loss, row["val/loss"])
        if row:
            self.tracker.log(c.step, row)

    def sample_if_due(self) -> None:
        every = self.cfg.trainer.sample_every
        if every and self.counters.step % every == 0:
            for text in self.samples(1):  # every rank generates (FSDP needs them all); rank 0 shows it
                if self.world.main:
                    self.bar.write(f"--- sample at step {self.counters.step} ---\n{text}")

    def samples(self, count: int) -> list[str]:
        from gpt2exp.generate import sample_texts

        return sample_texts(
            self.model,
            self.data.tokenizer,
            prompt="",
            count=count,
            max_new_tokens=self.cfg.trainer.sample_tokens,
            seed=self.cfg.seed + self.counters.step,
        )

    def save_if_due(self) -> None:
        """A checkpoint when checkpoint.every_steps/every_minutes says so, at the end (max_steps or an
        early stop), and on a signal.

        A background save that failed since the last step is reported here (checkpoint.on_save_error);
        the last save and a signal's save are waited for: the run ends only once they are committed.
        """
        c = self.counters
        self.checkpoints.poll()
        end = c.step == self.cfg.trainer.max_steps or self.early_stop_due()
        final = end and self.cfg.checkpoint.save_final
        metrics = {k: v for k, v in c.last_eval.items() if k != "step"} if c.last_eval.get("step") == c.step else {}
        asked = self.stop_requested()
        self.checkpoints.save(c.step, self.stateful, metrics, force=final or asked)
        if end or asked:
            self.checkpoints.flush()
            if final and not asked and not self.checkpoints.has(c.step):
                # on_save_error=warn let it fail, but no training follows it: the run is not complete
                # until a resume has trained these steps again from the newest checkpoint and saved them
                raise SaveFailed(
                    f"the final checkpoint (step {c.step}) was not saved; earlier checkpoints are intact: "
                    f"free space or fix permissions, then resume={self.run_dir} finishes the run from the newest one"
                )

    # -- stop conditions ---------------------------------------------------------------------------

    def stop_if_diverged(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise Diverged(f"training diverged at step {self.counters.step} (loss {loss}); lower optimizer.lr")

    def stop_if_asked(self) -> None:
        """After a preemption signal: save the steps trained since the last checkpoint, then stop.

        Checked at each step boundary (where save_if_due already saved) and after each phase outside
        the loop: start or resume, W&B start, the first evaluation, the final samples.
        """
        if not self.stop_requested():
            return
        step = self.counters.step
        if step > 0:
            self.save_if_due()  # forced by the signal; a step already saved is not written again
        if not step:
            done = "nothing trained yet, nothing to save"
        elif self.checkpoints.has(step):
            done = f"saved step {step}"
        else:  # checkpoint.on_save_error=warn let the save fail
            done = f"step {step} was not saved, a resume goes on from the newest checkpoint"
        log.warning("%s received: %s, stopping (exit %d)", self.preemption.signal_name, done, EXIT_PREEMPTED)
        raise Preempted(self.preemption)

    def stop_requested(self) -> bool:
        """Whether a signal asks the run to stop; with several ranks, whether it reached any of them
        (torchrun forwards a signal to every rank, SLURM may signal one): all stop at the same step."""
        from gpt2exp.distributed import any_rank

        return any_rank(self.preemption.requested)

    def prune_due(self) -> bool:
        """In an Optuna study: report this step's val/loss (when evaluated now); whether the study's pruner
        stops the trial here (gpt2exp/pruning.py)."""
        c = self.counters
        return c.last_eval.get("step") == c.step and self.trial.should_prune(c.step, c.last_eval["val/loss"])

    def stop_pruned(self) -> None:
        """Save the pruned trial's step (a step already saved is not written again) and end the run as
        `pruned`."""
        c = self.counters
        self.checkpoints.flush()  # a background save of this very step must be committed before save() looks
        self.checkpoints.save(c.step, self.stateful, {"val/loss": c.last_eval["val/loss"]}, force=True)
        self.checkpoints.flush()
        raise self.trial.pruned(c.step, c.last_eval["val/loss"])

    def stop_if_not_improving(self) -> None:
        """Early stopping: say so once the last trainer.early_stop_patience evaluations did not improve on
        the best val/loss; the loop then ends at this step, which save_if_due already saved (and waited
        for) as the end of the run. run() records `early_stopped`, exit 0; the final samples still follow."""
        if not self.early_stop_due():
            return
        t, c = self.cfg.trainer, self.counters
        log.info(
            "stopping early at step %d: val/loss did not improve on its best %.4f by more than "
            "trainer.early_stop_min_delta=%g in %d evaluations (trainer.early_stop_patience=%d)",
            c.step,
            c.best_val_loss if c.best_val_loss is not None else float("nan"),
            t.early_stop_min_delta,
            c.evals_without_improvement,
            t.early_stop_patience,
        )

    def early_stop_due(self) -> bool:
        """Whether the run ends here, before trainer.max_steps, because val/loss stopped improving."""
        t, c = self.cfg.trainer, self.counters
        patience = t.early_stop_patience
        return bool(patience) and c.evals_without_improvement >= patience and c.step < t.max_steps

    # -- the end -----------------------------------------------------------------------------------

    def finish(self) -> float:
        val_loss = self.counters.last_eval.get("val/loss", float("nan"))
        if self.cfg.trainer.num_samples:
            texts = self.samples(self.cfg.trainer.num_samples)
            self.stop_if_asked()  # a signal while sampling: no samples.txt, the resume writes it
            body = "".join(f"=== sample {i + 1} ===\n{text}\n\n" for i, text in enumerate(texts))
            if self.world.main:
                (self.run_dir / "samples.txt").write_text(body, encoding="utf-8")
                self.bar.close()
                print(body, end="", flush=True)
        early = " (stopped early)" if self.early_stop_due() else ""
        log.info("finished at step %d%s: val/loss %.4f; run dir %s", self.counters.step, early, val_loss, self.run_dir)
        return val_loss
