"""Train a GPT-2 under Hydra; every run can be resumed bit-for-bit.

    python -m gpt2exp.train                                   # tiny GPT-2 on Shakespeare, CPU minutes
    python -m gpt2exp.train +experiment=shakespeare_small     # a preset from conf/experiment/
    python -m gpt2exp.train -m optimizer.lr=1e-3,3e-4         # a sweep, one run dir per job
    python -m gpt2exp.train resume=outputs/<date>/<time>      # continue a run in its own dir
    python -m gpt2exp.train --cfg job                         # print the composed config

Phases of `train(cfg)`: 1) config of record, 2) build, 3) fresh start or resume, 4) the loop,
5) the end (final eval, checkpoint, samples).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpt2exp.config import register_schemas, validate
from gpt2exp.errors import EXIT_USAGE, UserError
from gpt2exp.preemption import EXIT_PREEMPTED, PreemptionFlag
from gpt2exp.rundir import (
    RunLock,
    code_version,
    config_digest,
    config_for_resume,
    fix_values_of_record,
    read_config_of_record,
    read_run_json,
    refuse_existing_run,
    resume_target,
    start_run_json,
    update_run_json,
    write_config_of_record,
)

log = logging.getLogger("gpt2exp")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def next_token_loss(model, inputs, targets):
    """Mean cross-entropy of `targets` (already shifted by one) under the model's logits for `inputs`."""
    import torch.nn.functional as F

    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class Diverged(UserError):
    """The loss became NaN or infinite; in a sweep this ends the job, not the sweep."""


class Preempted(Exception):
    """The run stopped on a signal after saving; the process should exit with EXIT_PREEMPTED."""

    def __init__(self, flag: PreemptionFlag):
        super().__init__(flag.signal_name)
        self.flag = flag


def pick_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is available; use device=auto or device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but MPS is not available; use device=auto or device=cpu")
    return torch.device(name)


def autocast_context(device, precision: str):
    import torch

    if precision == "fp32" or (precision == "fp16" and device.type == "cpu"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def run_log_file(run_dir: Path):
    """train.log in the run dir, appended to; Hydra already writes it when it launched us."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        yield
        return
    handler = logging.FileHandler(run_dir / "train.log", mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def hydra_context() -> tuple[Path | None, list[str], DictConfig | None]:
    """The Hydra run dir, this job's command-line overrides and, in a sweep, Hydra's config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, [], None
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    return Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task), hydra_cfg if in_sweep else None


# -- 1. the config of record ---------------------------------------------------------------------


def train(cfg: DictConfig, run_dir: str | Path | None = None, overrides: list[str] | None = None) -> float:
    """Train (or resume) in `run_dir`; returns the final validation loss.

    Under Hydra the run dir and overrides come from Hydra. On resume the setup is rebuilt from the
    run dir's config.yaml; only whitelisted keys among `overrides` (rundir.RESUMABLE_KEYS) apply.
    """
    import torch

    from gpt2exp.state import process_state_restored
    from gpt2exp.sweep import name_sweep_job

    hydra_dir, hydra_overrides, sweep = hydra_context()
    run_dir = Path(run_dir or hydra_dir or ".").resolve()
    overrides = hydra_overrides if overrides is None else overrides
    run_dir.mkdir(parents=True, exist_ok=True)
    target = resume_target(cfg.resume, run_dir) if cfg.resume else None
    if target is not None:
        if target.run_dir != run_dir:
            raise UserError(f"resume target {target.run_dir} is not this run dir {run_dir}")
        cfg = config_for_resume(read_config_of_record(run_dir), cfg, overrides)
    else:
        if cfg.resume != "auto":  # auto found no checkpoint: its earlier attempt is void
            refuse_existing_run(run_dir)
        cfg = fix_values_of_record(cfg, torch.get_num_threads())
        if sweep is not None:
            searched = list(OmegaConf.select(sweep, "sweeper.params", default=None) or {})
            cfg = name_sweep_job(cfg, Path(sweep.sweep.dir), overrides, sweep.runtime.cwd, searched)
    validate(cfg)
    with process_state_restored(), RunLock(run_dir), run_log_file(run_dir):
        return Trainer(cfg, run_dir).run(target.checkpoint if target else None, resume=target is not None)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.resumed_from: int | None = None  # the checkpoint step a resume started from

    # -- 2. build

    def build(self) -> None:
        import torch

        from gpt2exp.checkpoint import CheckpointManager
        from gpt2exp.data import BatchSampler, prepare_data, val_batches
        from gpt2exp.model import build_model, count_parameters
        from gpt2exp.optim import LRSchedule, build_optimizer
        from gpt2exp.state import RngState, TrainerCounters, seed_everything

        cfg, t = self.cfg, self.cfg.trainer
        torch.set_num_threads(t.num_threads)
        seed_everything(cfg.seed)
        self.device = pick_device(cfg.device)
        self.data = prepare_data(cfg.data)
        self.model = build_model(cfg.model, self.data.vocab_size, self.data.tokenizer.eos_token_id)
        self.model.to(self.device)
        log.info("model: %.2fM parameters, vocab %d", count_parameters(self.model) / 1e6, self.data.vocab_size)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, self.device.type)
        self.schedule = LRSchedule(self.optimizer, cfg.optimizer.lr, cfg.scheduler)
        use_scaler = t.precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.sampler = BatchSampler(self.data.train, cfg.model.block_size, t.batch_size, cfg.seed)
        self.val = val_batches(self.data.val, cfg.model.block_size, t.batch_size, t.eval_batches)
        self.counters = TrainerCounters()
        self.stateful: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scaler": self.scaler if use_scaler else None,
            "schedule": self.schedule,
            "sampler": self.sampler,
            "trainer": self.counters,
            "rng": RngState(),
        }
        identity = {"config_sha256": config_digest(cfg), "code_version": code_version()}
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, self.data.tokenizer_dir, identity)
        self.step_fn = self.model
        if t.compile and self.device.type == "cuda":
            self.step_fn = torch.compile(self.model)
        self.autocast = autocast_context(self.device, t.precision)

    # -- 3. fresh start or resume

    def start(self, checkpoint: Path | None, resume: bool) -> int | None:
        """Prepare the run dir; returns the step W&B should rewind to (None for a fresh run)."""
        from gpt2exp.tracking import truncate_metrics

        if not resume:
            write_config_of_record(self.run_dir, self.cfg)
            info = start_run_json(self.run_dir, parent=None)
            shutil.copytree(self.data.tokenizer_dir, self.run_dir / "tokenizer", dirs_exist_ok=True)
            # a fresh start in a dir whose earlier attempt never checkpointed: its rows are void
            truncate_metrics(self.run_dir, -1)
            self.counters.wandb_id = info["wandb_id"]
            return None
        loaded = self.checkpoints.load(self.stateful, checkpoint)
        if loaded.trainer_state.get("config_sha256") != config_digest(self.cfg):
            log.warning("%s was saved under another config than this run's config.yaml", loaded.path.name)
        info = read_run_json(self.run_dir)
        dropped = truncate_metrics(self.run_dir, loaded.step)
        resumes = info.get("resumes", []) + [{"step": loaded.step, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        update_run_json(self.run_dir, status="running", resumes=resumes)
        log.info(
            "resumed from step %d of run %s (W&B id %s)%s",
            loaded.step,
            info.get("run_id"),
            self.counters.wandb_id,
            f"; dropped {dropped} metrics rows logged after it" if dropped else "",
        )
        return loaded.step

    def run(self, checkpoint: Path | None, resume: bool) -> float:
        from gpt2exp.tracking import Tracker

        self.build()
        rewind_to = self.start(checkpoint, resume)
        self.resumed_from = rewind_to
        self.tracker = Tracker(self.cfg.logger, self.run_dir)
        self.tracker.start_wandb(self.counters.wandb_id, OmegaConf.to_container(self.cfg, resolve=True), rewind_to)
        exit_code, status = 1, "failed"
        try:
            val_loss = self.loop()
            exit_code, status = 0, "completed"
            return val_loss
        except Preempted:
            exit_code, status = EXIT_PREEMPTED, "preempted"
            raise
        except Diverged:
            status = "diverged"  # final: a rerun would diverge again, bit for bit
            raise
        finally:
            self.tracker.finish(exit_code)
            self.checkpoints.close()
            update_run_json(self.run_dir, status=status, ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    # -- 4. the loop

    def loop(self) -> float:
        from tqdm import tqdm

        cfg, t, c = self.cfg, self.cfg.trainer, self.counters
        tokens_per_step = t.batch_size * t.grad_accum_steps * cfg.model.block_size
        resumed = self.resumed_from is not None
        bar = tqdm(
            total=t.max_steps,
            initial=c.step,
            desc=f"resumed at {self.resumed_from}" if resumed else "train",
            disable=not t.progress,
            dynamic_ncols=True,
            leave=False,
        )
        if c.step == 0 and t.eval_every:  # the starting point of the validation curve
            c.last_eval = {"val/loss": self.evaluate(), "step": 0}
            self.tracker.log(0, {"val/loss": c.last_eval["val/loss"]})
        window_start, window_steps = time.perf_counter(), 0
        with PreemptionFlag() as preemption:
            while c.step < t.max_steps:
                lr = self.schedule.apply(c.step)
                loss = self.train_step()
                c.step += 1
                c.tokens_seen += tokens_per_step
                window_steps += 1
                bar.update(1)
                metrics: dict[str, float] = {}
                if c.step % t.log_every == 0 or c.step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                    metrics = {
                        "train/loss": loss,
                        "lr": lr,
                        "tokens_per_s": tokens_per_s,
                        "tokens": c.tokens_seen,
                    }
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                aside_start = time.perf_counter()  # eval, samples and saving stay out of tokens_per_s
                if (t.eval_every and c.step % t.eval_every == 0) or c.step == t.max_steps:
                    metrics["val/loss"] = self.evaluate()
                    c.last_eval = {"val/loss": metrics["val/loss"], "step": c.step}
                    log.info("step %d: train/loss %.4f val/loss %.4f", c.step, loss, metrics["val/loss"])
                if metrics:
                    self.tracker.log(c.step, metrics)
                    c.last_logged_step = c.step
                if t.sample_every and c.step % t.sample_every == 0:
                    for text in self.samples(1):
                        bar.write(f"--- sample at step {c.step} ---\n{text}")
                final = c.step == t.max_steps and self.cfg.checkpoint.save_final
                self.save(force=final or preemption.requested)
                window_start += time.perf_counter() - aside_start
                if preemption.requested:
                    bar.close()
                    log.warning(
                        "%s received: saved step %d, stopping (exit %d)",
                        preemption.signal_name,
                        c.step,
                        EXIT_PREEMPTED,
                    )
                    raise Preempted(preemption)
        bar.close()
        return self.finish()

    def train_step(self) -> float:
        import torch

        t = self.cfg.trainer
        self.model.train()
        total = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum_steps):
            x, y = (torch.from_numpy(a).to(self.device) for a in self.sampler.next_batch())
            with self.autocast:
                loss = next_token_loss(self.step_fn, x, y) / t.grad_accum_steps
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if t.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        total = total.item()  # one device sync per step, not per micro-batch
        if not math.isfinite(total):
            raise Diverged(f"training diverged at step {self.counters.step + 1} (loss {total}); lower optimizer.lr")
        return total

    def evaluate(self) -> float:
        import torch

        self.model.eval()
        losses = []
        with torch.no_grad(), self.autocast:
            for x, y in self.val:
                x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
                losses.append(next_token_loss(self.model, x, y).item())
        return float(sum(losses) / len(losses))

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

    def save(self, force: bool) -> None:
        metrics = {k: v for k, v in self.counters.last_eval.items() if k != "step"}
        if metrics and self.counters.last_eval.get("step") != self.counters.step:
            metrics = {}  # rank checkpoints only by metrics measured at their own step
        self.stateful["trainer"].best_metric = self._best(metrics)
        self.checkpoints.save(self.counters.step, self.stateful, metrics, force=force)

    def _best(self, metrics: dict[str, float]) -> float | None:
        current, best = metrics.get(self.cfg.checkpoint.best_metric), self.counters.best_metric
        if current is None:
            return best
        if best is None:
            return current
        return min(current, best) if self.cfg.checkpoint.best_mode == "min" else max(current, best)

    # -- 5. the end

    def finish(self) -> float:
        val_loss = self.counters.last_eval.get("val/loss", float("nan"))
        if self.cfg.trainer.num_samples:
            texts = self.samples(self.cfg.trainer.num_samples)
            body = "".join(f"=== sample {i + 1} ===\n{text}\n\n" for i, text in enumerate(texts))
            (self.run_dir / "samples.txt").write_text(body, encoding="utf-8")
            print(body, end="", flush=True)
        log.info("finished at step %d: val/loss %.4f; run dir %s", self.counters.step, val_loss, self.run_dir)
        return val_loss


# -- the command line ----------------------------------------------------------------------------


def run_job(cfg: DictConfig) -> float:
    """The Hydra task: `train(cfg)`, with user errors as one line and exit 2, preemption as exit 75.

    A diverged job in a sweep returns +inf instead of ending the sweep.
    """
    try:
        val_loss = train(cfg)
        if hydra_context()[2] is not None and not math.isfinite(val_loss):
            return float("inf")  # no evaluation ran; Optuna refuses NaN, and +inf scores the trial worst
        return val_loss
    except UserError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if isinstance(exc, Diverged) and hydra_context()[2] is not None:
            return float("inf")  # the job ends, the sweep goes on; Optuna scores it worst (it refuses NaN)
        raise SystemExit(EXIT_USAGE) from None
    except Preempted as exc:
        exc.flag.hand_over()  # under submitit: its handler requeues the job (and exits)
        raise SystemExit(EXIT_PREEMPTED) from None


def main() -> None:
    import hydra

    from gpt2exp.launch import prepare_argv

    register_schemas()
    sys.argv = prepare_argv(sys.argv, CONF_DIR)
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(run_job)()


if __name__ == "__main__":
    main()
