"""GPU throughput and MFU of GPT-2 124M: gpt2exp against a bare HF loop and nanoGPT-style settings,
and how long the loop stands still per checkpoint save, synchronous against background.

    python benchmarks/gpu.py                                   # on a CUDA GPU (bf16)
    python benchmarks/gpu.py --steps 50 --batch-size 32 --grad-accum 2
    python benchmarks/gpu.py --saves 0 --baselines '' --variant trainer.deterministic=true   # gpt2exp rows only
    python benchmarks/gpu.py --device cpu --model gpt2_tiny --steps 5 --warmup 1   # a smoke run of the code

The three methods (--baselines picks the HF loops that run) train the same model shape on the same
batches (gpt2exp's sampler over the Shakespeare tokens; the preset asks its BPE for 50257 tokens, the
plays give 45659), each optimizer step over --grad-accum micro-batches of --batch-size sequences (the
preset's 2 x 32 unless given), one after another, each after --warmup untimed steps (compilation happens there):
1. gpt2exp: `Trainer(cfg, run_dir)` of `+experiment=gpt2_124m` (bf16 autocast, fused AdamW,
   torch.compile of the model with its loss, SDPA attention with the causal mask left to the kernel
   (flash), TF32, pinned batches, the vocabulary padded to a multiple of 64), `Trainer.step()` per step;
2. bare HF loop: `GPT2LMHeadModel` (the tokenizer's vocabulary, unpadded) in fp32,
   `model(input_ids, labels=...)`, `torch.optim.AdamW` with its defaults, no autocast, no compile, no TF32;
3. nanoGPT-style: the HF model with nanoGPT's settings: the vocabulary padded to a multiple of 64,
   TF32, bf16 autocast, fused AdamW, torch.compile, flash attention (gpt2exp's causal mask).
Each `--variant OVERRIDES` adds a gpt2exp row with those overrides on top (e.g. `--variant
model.vocab_multiple=1` for the unpadded vocabulary, `--variant trainer.deterministic=true`).
MFU = tokens/s x (6N + 12LHQT) / the GPU's dense bf16 peak (gpt2exp/mfu.py). Then, with gpt2exp's
state: the seconds the loop is blocked per save with checkpoint.async_save=false (the whole save)
and =true (the state frozen and its copy started, then `wait_snapshot()` before the next optimizer
update, after the next step's forward and backward).
Targets (issue 11): gpt2exp >= 45% MFU on an H100 and >= 1.0x the bare loop's tokens/s; blocked
per background save <= 5% of a synchronous one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MFU_TARGET, BARE_TARGET, BLOCKED_TARGET = 0.45, 1.0, 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: the preset's)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: the preset's)")
    parser.add_argument("--model", default="gpt2_124m", help="a model preset of conf/model/")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--saves",
        type=int,
        default=3,
        help="saves per mode timed after the first (printed apart); 0: none",
    )
    parser.add_argument(
        "--baselines",
        default="bare,nanogpt",
        help="the HF loops to run beside gpt2exp, comma-separated: bare, nanogpt ('' for none: GPU time is short)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help="another gpt2exp row: space-separated overrides on top of the preset (repeatable)",
    )
    args = parser.parse_args(argv)
    args.baselines = [name.strip() for name in args.baselines.split(",") if name.strip()]
    if unknown := sorted(set(args.baselines) - {"bare", "nanogpt"}):
        parser.error(f"unknown --baselines {', '.join(unknown)}; choose from bare, nanogpt")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; run it on a GPU machine, or use --device cpu for a smoke run")
    return args


def compose_cfg(args, run_steps: int, extra: list[str] = ()):
    from gpt2exp.composing import compose
    from gpt2exp.config import CONF_DIR, register_schemas
    from gpt2exp.resume import fix_values_of_record

    register_schemas()
    overrides = [
        "+experiment=gpt2_124m",
        f"model={args.model}",
        f"device={args.device}",
        *([f"trainer.batch_size={args.batch_size}"] if args.batch_size else []),
        *([f"trainer.grad_accum_steps={args.grad_accum}"] if args.grad_accum else []),
        f"trainer.max_steps={run_steps}",
        "trainer.progress=false",
        "logger=none",
        *extra,
    ]
    return fix_values_of_record(compose(CONF_DIR, overrides), torch.get_num_threads())


def timed(step, warmup: int, steps: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def run_gpt2exp(cfg, args, sync) -> tuple[float, object]:
    from gpt2exp.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="gpt2exp-gpu-bench-"))
    trainer = Trainer(cfg, run_dir)
    return timed(trainer.step, args.warmup, args.steps, sync), trainer


def run_variant(args, overrides: str, sync) -> float:
    """Tokens/s of gpt2exp with `overrides` on top of the preset (its own tokens per step); the trainer is let go."""
    import torch

    cfg = compose_cfg(args, run_steps=10 * (args.warmup + args.steps), extra=overrides.split())
    seconds, trainer = run_gpt2exp(cfg, args, sync)
    rate = args.steps * trainer.tokens_per_step / seconds
    trainer.checkpoints.close()
    del trainer
    torch.use_deterministic_algorithms(False)  # a deterministic variant leaves the process as it found it
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rate


def run_hf(cfg, args, batches, sync, nanogpt: bool) -> float:
    from omegaconf import OmegaConf
    from transformers import GPT2LMHeadModel

    from gpt2exp.model import scratch_config
    from gpt2exp.trainer import autocast_context

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = nanogpt
    torch.manual_seed(cfg.seed)
    shape = OmegaConf.merge(cfg.model, {"vocab_multiple": 64 if nanogpt else 1})
    config = scratch_config(shape, batches.vocab_size, batches.eos_id)
    if not nanogpt:
        config._attn_implementation = "sdpa"  # transformers' own, as a bare loop has it
    model = GPT2LMHeadModel(config).to(device)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, fused=nanogpt or None
    )
    forward = torch.compile(model) if nanogpt and args.device == "cuda" else model
    autocast = autocast_context(device, "bf16" if nanogpt else "fp32")
    it, accum = iter(batches), cfg.trainer.grad_accum_steps

    def step() -> None:
        for _ in range(accum):
            x = next(it).to(device, non_blocking=True)
            with autocast:
                loss = forward(input_ids=x, labels=x).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # one read per step, as gpt2exp does

    try:
        return timed(step, args.warmup, args.steps, sync)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


class Batches:
    """The windows gpt2exp's sampler draws, for the HF loops (inputs only: labels are the inputs):
    `steps` optimizer steps of trainer.grad_accum_steps micro-batches."""

    def __init__(self, trainer, steps: int):
        from gpt2exp.data import BatchSampler

        cfg = trainer.cfg
        sampler = BatchSampler(trainer.data.train, cfg.model.block_size, cfg.trainer.batch_size, cfg.seed)
        pin = trainer.device.type == "cuda"
        count = steps * cfg.trainer.grad_accum_steps
        self.inputs = [torch.from_numpy(sampler.next_batch()[0].copy()) for _ in range(count)]
        self.inputs = [x.pin_memory() if pin else x for x in self.inputs]
        self.vocab_size, self.eos_id = trainer.data.vocab_size, trainer.data.tokenizer.eos_token_id

    def __iter__(self):
        return iter(self.inputs)


def blocked_per_save(trainer, saves: int, sync) -> tuple[dict[str, list[float]], tuple[float, float]]:
    """Seconds the loop stands still per save of the trainer's state, sync against background: the
    first save of each manager, then `saves` more; and for the background manager's snapshot buffers,
    which a run makes once, after its first step (Trainer.step): the seconds the loop was held, and
    until they were page-locked (CUDA: in the background).

    Each round times a save followed by one training step (to the device's end) and takes off the
    median time of a step without a save: what the save added to the loop, however it was spent
    (on the host, or as the optimizer's kernels waiting for the snapshot's copy on the device).
    """
    from omegaconf import OmegaConf

    from gpt2exp.checkpoint import CheckpointManager

    def one_step() -> float:
        sync()
        start = time.perf_counter()
        trainer.step()
        sync()
        return time.perf_counter() - start

    plain = statistics.median(one_step() for _ in range(3))
    trainer.checkpoints.close()  # the run's own manager and its page-locked buffers: each mode brings its own
    blocked: dict[str, list[float]] = {"sync": [], "async": []}
    reserve = (0.0, 0.0)
    for mode in ("sync", "async"):
        cfg = OmegaConf.merge(trainer.cfg.checkpoint, {"async_save": mode == "async", "every_minutes": 0.0})
        manager = CheckpointManager(cfg, trainer.run_dir / f"bench-{mode}", trainer.data.tokenizer_dir)
        trainer.checkpoints = manager  # Trainer.step waits on this manager's snapshot
        try:
            start = time.perf_counter()
            pinning = manager.reserve_snapshot(trainer.stateful)  # as the trainer's first step does it
            held = time.perf_counter() - start
            if pinning is not None:  # page-locked in the background, long before a run's first save
                pinning.result()
            reserve = (held, time.perf_counter() - start) if mode == "async" else reserve
            for i in range(1 + saves):
                sync()
                start = time.perf_counter()
                pending = manager.save(1000 + i, trainer.stateful, {}, force=True)
                if mode == "sync":
                    pending.wait()
                trainer.step()
                sync()
                blocked[mode].append(time.perf_counter() - start - plain)
                pending.wait()  # the background commit, before the next round
        finally:
            manager.close()
    return blocked, reserve


def main(argv: list[str] | None = None) -> int:
    from gpt2exp.mfu import mfu, peak_flops

    args = parse_args(argv)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    cfg = compose_cfg(args, run_steps=10 * (args.warmup + args.steps + args.saves))
    seconds, trainer = run_gpt2exp(cfg, args, sync)
    per_token, peak = trainer.flops_per_token, peak_flops(trainer.device)
    tokens = args.steps * trainer.tokens_per_step
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    t = cfg.trainer
    print(f"{args.model}, {t.grad_accum_steps} x {t.batch_size} x {cfg.model.block_size} tokens per step, "
          f"{args.steps} timed steps on {name}")  # fmt: skip
    width = max([24, *(len(f"gpt2exp {overrides}") for overrides in args.variant)])
    print(f"{'method':<{width}} {'tokens/s':>12} {'MFU':>7}")
    rates: dict[str, float] = {}

    def row(method: str, rate: float) -> None:  # each row as soon as it is measured
        rates[method] = rate
        util = mfu(rate, per_token, peak)
        print(f"{method:<{width}} {rate:>12,.0f} {'-' if util is None else f'{100 * util:.1f}%':>7}", flush=True)

    row("gpt2exp Trainer.step", tokens / seconds)
    batches = Batches(trainer, args.warmup + args.steps) if args.baselines else None
    ours = rates["gpt2exp Trainer.step"]
    if "bare" in args.baselines:
        row("bare HF loop", tokens / run_hf(trainer.cfg, args, batches, sync, nanogpt=False))
        print(f"gpt2exp / bare HF loop = {ours / rates['bare HF loop']:.2f}x (target >= {BARE_TARGET})")
    if "nanogpt" in args.baselines:
        row("nanoGPT-style HF loop", tokens / run_hf(trainer.cfg, args, batches, sync, nanogpt=True))
        print(f"gpt2exp / nanoGPT-style = {ours / rates['nanoGPT-style HF loop']:.2f}x (reference)")
    util = mfu(ours, per_token, peak)
    if util is not None:
        print(f"gpt2exp MFU = {100 * util:.1f}% (target >= {100 * MFU_TARGET:.0f}% on an H100)", flush=True)
    for overrides in args.variant:
        row(f"gpt2exp {overrides}", run_variant(args, overrides, sync))
    if args.saves:
        blocked, reserve = blocked_per_save(trainer, args.saves, sync)
        for mode, (first, *values) in blocked.items():
            print(f"loop blocked per save, async_save={mode == 'async'}: median {statistics.median(values):.3f} s; "
                  + " ".join(f"{v:.3f}" for v in values) + f" (the run's first save: {first:.3f} s)")  # fmt: skip
            blocked[mode] = values
        print(f"background save buffers, made once after the run's first step: the loop held {reserve[0]:.3f} s, "
              f"page-locked after {reserve[1]:.3f} s")  # fmt: skip
        ratio = statistics.median(blocked["async"]) / statistics.median(blocked["sync"])
        print(f"blocked async / sync = {ratio:.3f} (target <= {BLOCKED_TARGET} on a GPU)")
    trainer.checkpoints.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
