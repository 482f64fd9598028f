"""Training throughput of gpt2exp's step against a bare PyTorch loop and transformers' Trainer.

Run from the repository root (CPU, fp32; the token cache is built on first use):

    HF_HUB_OFFLINE=1 python benchmarks/throughput.py
    python benchmarks/throughput.py --steps 20 --repeats 1          # a quick check
    python benchmarks/throughput.py --model gpt2_mini --batch-size 8 --threads 4

The methods train the same GPT-2 (same shape, same seeded initial weights, checked) on the same
batches (the first windows of gpt2exp's BatchSampler over the training tokens). gpt2exp builds it
with its model config; the bare loop and Trainer with what transformers' `GPT2Config` gives for
that shape, whose MLP runs GPT-2's tanh GELU as Python ops (`gelu_new`) where gpt2exp runs the same
formula as one kernel (`model.activation=gelu_pytorch_tanh`). A fourth row gives Trainer gpt2exp's
model config, so the table also shows what the loop alone is worth:

1. gpt2exp: `gpt2exp.trainer.Trainer(cfg, run_dir)`, then `Trainer.step()` per step, the very
   method its training loop calls (no eval, logging or checkpoints in the timed steps);
2. bare: `GPT2LMHeadModel` + `torch.optim.AdamW`; forward with labels, backward, clip the gradient
   norm, step, zero_grad, nothing else;
3. Trainer: `transformers.Trainer` (saving, eval, logging and reporting off) on a Dataset of the
   same windows in the same order; it keeps its own default optimizer (fused AdamW with torch>=2.8);
4. Trainer, gpt2exp's model config: the same, built from gpt2exp's config (reference, no target).

Each method runs `--warmup` untimed steps, then `--steps` timed ones, from a fresh build. They
run in a rotated order for `--repeats` rounds; the table shows the median tokens/s of each.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from scratch: no hub access needed

import torch  # noqa: E402

METHODS = ("gpt2exp", "bare", "trainer", "trainer_same")
LABELS = {
    "gpt2exp": "gpt2exp Trainer.step",
    "bare": "bare PyTorch loop",
    "trainer": "transformers Trainer",
    "trainer_same": "transformers Trainer, gpt2exp's model config",
}
NOISY_SPREAD = 1.25  # fastest / slowest round of one method above which the figures are not to be trusted
TARGETS = (
    ("gpt2exp / bare", "bare", 1.0),
    ("gpt2exp / Trainer", "trainer", 1.05),
    ("gpt2exp / Trainer, same config", "trainer_same", None),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps per method and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three methods, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", default="gpt2_tiny", help="a model config in conf/model/")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (block_size tokens each)")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "repeats", "threads", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# -- the shared setup ----------------------------------------------------------------------------


class Setup:
    """The composed gpt2exp config, the pre-generated batches and what the other methods need."""

    def __init__(self, args: argparse.Namespace):
        from transformers import GPT2Config

        from gpt2exp.composing import compose
        from gpt2exp.config import CONF_DIR, register_schemas
        from gpt2exp.data import BatchSampler, prepare_data
        from gpt2exp.model import quiet_transformers, scratch_config
        from gpt2exp.resume import fix_values_of_record

        quiet_transformers()
        register_schemas()
        self.warmup, self.steps, self.threads = args.warmup, args.steps, args.threads
        total = args.warmup + args.steps
        overrides = [
            f"model={args.model}",
            f"trainer.batch_size={args.batch_size}",
            f"trainer.max_steps={total}",
            f"trainer.num_threads={args.threads}",
            "trainer.precision=fp32",
            "trainer.grad_accum_steps=1",
            "trainer.progress=false",
            "device=cpu",
            "logger=none",
        ]
        self.cfg = fix_values_of_record(compose(CONF_DIR, overrides), args.threads)
        torch.set_num_threads(args.threads)
        m, t = self.cfg.model, self.cfg.trainer
        self.block_size, self.batch_size = m.block_size, t.batch_size
        self.tokens_per_step = self.block_size * self.batch_size
        data = prepare_data(self.cfg.data)
        self.model_config = scratch_config(m, data.vocab_size, data.tokenizer.eos_token_id)
        # the same shape as transformers' GPT2Config has it by default: its activation and attention
        self.transformers_config = copy.deepcopy(self.model_config)
        self.transformers_config.activation_function = GPT2Config().activation_function
        self.transformers_config._attn_implementation = "sdpa"
        self.vocab_size = data.vocab_size
        # the batches gpt2exp's own sampler will draw: same tokens, block, batch size and seed
        sampler = BatchSampler(data.train, m.block_size, t.batch_size, self.cfg.seed)
        self.inputs = [torch.from_numpy(sampler.next_batch()[0].copy()) for _ in range(total)]
        self.sampler_end = sampler.state_dict()
        self.init_digest = digest(self.new_model())
        self.params = sum(p.numel() for p in self.new_model().parameters())
        self.trainer_optim = "?"  # the optimizer Trainer picked, filled in by run_trainer

    def new_model(self, gpt2exp_config: bool = True):
        """A freshly initialised model, seeded as gpt2exp's build() seeds its own: with gpt2exp's model
        config, or with transformers' defaults for the same shape."""
        from transformers import GPT2LMHeadModel

        torch.manual_seed(self.cfg.seed)
        return GPT2LMHeadModel(self.model_config if gpt2exp_config else self.transformers_config)


def digest(model) -> str:
    """A hash of the model's weights, to check that every method starts from the same ones."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_same_start(setup: Setup, model, method: str) -> None:
    if digest(model) != setup.init_digest:
        raise SystemExit(f"error: the {method} model does not start from the same weights as the others")


# -- the three methods; each returns the seconds of its timed steps ----------------------------------


def run_gpt2exp(setup: Setup) -> float:
    from gpt2exp.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="gpt2exp-bench-") as run_dir:
        trainer = Trainer(setup.cfg, Path(run_dir))
        try:
            check_same_start(setup, trainer.model, "gpt2exp")
            for _ in range(setup.warmup):
                trainer.step()
            start = time.perf_counter()
            for _ in range(setup.steps):
                trainer.step()
            elapsed = time.perf_counter() - start
        finally:
            trainer.checkpoints.close()
    if trainer.sampler.state_dict() != setup.sampler_end:
        raise SystemExit("error: gpt2exp's sampler drew other batches than the pre-generated ones")
    return elapsed


def run_bare(setup: Setup) -> float:
    torch.set_num_threads(setup.threads)
    model = setup.new_model(gpt2exp_config=False)
    check_same_start(setup, model, "bare")
    model.train()
    opt_cfg = setup.cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [  # the usual split, as gpt2exp and Trainer do it: no decay on biases and LayerNorm weights
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt_cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)
    max_norm = setup.cfg.trainer.grad_clip

    def step(x: torch.Tensor) -> None:
        loss = model(input_ids=x, labels=x, use_cache=False).loss  # the model shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for x in setup.inputs[: setup.warmup]:
        step(x)
    start = time.perf_counter()
    for x in setup.inputs[setup.warmup :]:
        step(x)
    return time.perf_counter() - start


class WindowDataset(torch.utils.data.Dataset):
    """The pre-generated windows one by one, as Trainer wants them: input_ids and labels (the same)."""

    def __init__(self, inputs: list[torch.Tensor]):
        self.windows = torch.cat(inputs)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.windows[index]
        return {"input_ids": window, "labels": window}


def run_trainer(setup: Setup, gpt2exp_config: bool = False) -> float:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class StepClock(TrainerCallback):
        """Times the steps after the warmup: from the end of step `warmup` to the end of the last."""

        def __init__(self) -> None:
            self.start = self.end = None
            self.threads = None

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()
            if state.global_step == setup.warmup:
                self.start = self.end
                self.threads = torch.get_num_threads()

    torch.set_num_threads(setup.threads)
    model = setup.new_model(gpt2exp_config)
    check_same_start(setup, model, "Trainer")
    model.config.use_cache = False  # what gpt2exp and the bare loop pass per call: no KV cache while training
    opt_cfg = setup.cfg.optimizer
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="hf-trainer-bench-") as out_dir:
        args = TrainingArguments(
            output_dir=out_dir,
            max_steps=setup.warmup + setup.steps,
            per_device_train_batch_size=setup.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=opt_cfg.lr,
            adam_beta1=opt_cfg.betas[0],
            adam_beta2=opt_cfg.betas[1],
            adam_epsilon=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
            max_grad_norm=setup.cfg.trainer.grad_clip,
            lr_scheduler_type="cosine",
            warmup_steps=min(setup.cfg.scheduler.warmup_steps, setup.warmup + setup.steps),
            train_sampling_strategy="sequential",  # the windows in gpt2exp's order
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            seed=setup.cfg.seed,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=WindowDataset(setup.inputs),
            data_collator=default_data_collator,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict even with logging off
        trainer.train()
    if trainer.state.global_step != setup.warmup + setup.steps or clock.start is None:
        raise SystemExit(f"error: Trainer ran {trainer.state.global_step} steps, not {setup.warmup + setup.steps}")
    if clock.threads != setup.threads:
        print(f"warning: Trainer ran on {clock.threads} torch threads, not {setup.threads}", file=sys.stderr)
    setup.trainer_optim = getattr(args.optim, "value", str(args.optim))
    return clock.end - clock.start


RUNNERS = {
    "gpt2exp": run_gpt2exp,
    "bare": run_bare,
    "trainer": run_trainer,
    "trainer_same": functools.partial(run_trainer, gpt2exp_config=True),
}


# -- the report ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = Setup(args)
    rates: dict[str, list[float]] = {name: [] for name in METHODS}
    for round_index in range(args.repeats):
        shift = round_index % len(METHODS)
        for name in METHODS[shift:] + METHODS[:shift]:  # rotate the order each round
            seconds = RUNNERS[name](setup)
            rates[name].append(setup.tokens_per_step * setup.steps / seconds)
    median = {name: statistics.median(values) for name, values in rates.items()}

    print(
        f"{args.model}: {setup.params / 1e6:.2f}M params (vocab {setup.vocab_size}), batch {setup.batch_size} x "
        f"{setup.block_size} tokens, fp32, {args.threads} threads, {args.warmup} warmup + {args.steps} timed steps, "
        f"{args.repeats} round(s); Trainer optim={setup.trainer_optim}"
    )
    width = max(len(label) for label in LABELS.values())
    print(f"{'method':<{width}}  {'median tok/s':>12}  {'best tok/s':>10}  per round")
    for name in METHODS:
        per_round = " ".join(f"{value:,.0f}" for value in rates[name])
        print(f"{LABELS[name]:<{width}}  {median[name]:>12,.0f}  {max(rates[name]):>10,.0f}  {per_round}")
    label_width = max(len(label) for label, _, _ in TARGETS)
    for label, other, target in TARGETS:
        ratio = median["gpt2exp"] / median[other]
        if target is None:
            print(f"{label:<{label_width}} = {ratio:.3f}  (reference: the loop alone)")
            continue
        verdict = "PASS" if ratio >= target else "FAIL"
        print(f"{label:<{label_width}} = {ratio:.3f}  (target >= {target:.2f}, from the medians)  {verdict}")
    spread = max(max(values) / min(values) for values in rates.values())
    if spread > NOISY_SPREAD:
        print(
            f"note: rounds differ up to {spread:.1f}x, so the CPU was busy with something else; "
            "rerun on an idle machine or with more --repeats"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
