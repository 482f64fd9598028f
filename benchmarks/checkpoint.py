"""What checkpoints cost: CheckpointManager save/load vs plain file I/O, and training with vs without.

Run from the repository root (CPU, fp32; as root the page cache is dropped before every timed save,
read and load, otherwise all of them run warm; the token cache is built on first use):

    python benchmarks/checkpoint.py
    python benchmarks/checkpoint.py --repeats 1                      # a quick check

1. save: the gpt2_124m shape (conf/model/gpt2_124m.yaml, vocab 50257, fp32) with AdamW state after one
   step on a tiny batch, plus the JSON state Trainer saves (schedule, sampler, counters, RNG).
   `CheckpointManager.save(step, stateful, metrics, force=True).wait()` (serialise, fsync, sha256
   manifest, rename, `latest`) against writing the same files (same names, sizes and bytes, held in memory
   beforehand) with one `f.write` + `flush` + `os.fsync` each. `torch.save({'model': sd,
   'optimizer': osd})` + fsync is shown for reference. Every save goes into an empty checkpoints dir
   (no rotation in the timed call); what each method wrote is deleted, untimed, before the next.
2. load: `CheckpointManager.load(stateful, target)` into a freshly built model, optimizer and state
   objects, with checkpoint.verify=sha256 and with verify=size, against opening and reading every
   file of the same checkpoint dir.
3. blocked: how long the training loop stands still per save of the same 124M state: a
   synchronous save (`checkpoint.async_save=false`, the whole save) against a background one
   (`save()` freezes the state and starts the copy; `wait_snapshot()` before the next optimizer
   update, after the next step's real forward+backward, batch 1 x --next-tokens).
4. train: --train-model (gpt2_mini, batch --train-batch) on Shakespeare: two `Trainer(cfg, run_dir)`
   + `start_fresh()` in this process, one with checkpoint.every_steps=--every-steps and one with 0
   (every_minutes=0, save_final=false in both), take turns of --turn steps of their loop's step and
   save phases, `Trainer.step()` + `Trainer.save_if_due()` (no eval or logging). Taking turns puts
   the machine's drift on both alike; the one with checkpoints ends each turn waiting for its save
   in flight, so the background work is charged to it. A round is --every-steps steps of each (one
   save), printed as it ends; the ratio is over all rounds. The seconds spent inside `save_if_due`
   are shown too. The preset's batch is 16; 4 makes steps ~4x shorter, so each save weighs ~4x more
   (a stricter test, ~6 min with the defaults on 2 cores).

Each method of the save, load and blocked sections runs --repeats times, interleaved in a rotated
order; the table shows medians and every round. Read the rounds as well as the medians: on a shared
or virtual machine other processes, and the host reclaiming freed guest memory, can slow single
rounds several-fold.
Everything is written under a fresh temporary dir (inside --workdir if given, else under $TMPDIR or
/tmp, which may share a disk with the repository) and removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_options import DROP_CACHES, settle_sections_and_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from scratch or from the local cache

import numpy as np  # noqa: E402
import torch  # noqa: E402

GPT2_VOCAB = 50257
SAVE_TARGET, LOAD_TARGET, TRAIN_TARGET, BLOCKED_TARGET = 1.1, 2.0, 0.99, 0.10
SECTIONS = ("save", "load", "blocked", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each section's methods, interleaved")
    parser.add_argument("--steps", type=int, default=300, help="train: timed steps of each trainer")
    parser.add_argument("--warmup", type=int, default=5, help="train: untimed steps of each trainer first")
    parser.add_argument("--every-steps", type=int, default=100, help="train: checkpoint.every_steps (one round)")
    parser.add_argument("--turn", type=int, default=10, help="train: steps a trainer runs before the other's turn")
    parser.add_argument("--train-model", default="gpt2_mini", help="train: the model preset")
    parser.add_argument(
        "--train-batch", type=int, default=4, help="train: trainer.batch_size (shorter steps weigh saves more)"
    )
    parser.add_argument(
        "--next-tokens", type=int, default=256, help="blocked: tokens of the next step's forward+backward (batch 1)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (a temp dir is made inside)")
    parser.add_argument(
        "--cache",
        choices=("auto", "cold", "warm"),
        default="auto",
        help="page cache before each timed save/read/load: cold drops it (root only); auto = cold if allowed",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS)
    )
    args = parser.parse_args(argv)
    for name in ("repeats", "steps", "every_steps", "turn", "train_batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    settle_sections_and_cache(parser, args, SECTIONS)
    if "train" in args.sections:
        if args.turn < 3:
            parser.error("--turn must be at least 3 (a save, then steps of the same turn while it is written)")
        if args.every_steps % args.turn or args.steps % args.every_steps:
            parser.error("--every-steps must be a multiple of --turn, and --steps a multiple of --every-steps")
        position = save_position(args)
        if args.turn - position < 2:  # the turn's closing flush would wait for most of the write
            parser.error(
                f"the saves fall on step {position} of a {args.turn}-step turn, too close to its end: "
                f"change --warmup (the saves come at step {args.turn // 2} with --warmup "
                f"{(args.every_steps - args.turn // 2) % args.turn})"
            )
    return args


# -- helpers -------------------------------------------------------------------------------------


class Timings:
    """Seconds per method and round (reported as medians), and the bytes behind the MB/s column."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}
        self.bytes: dict[str, int] = {}  # bytes each save method wrote, or the load methods read
        self.files: dict[str, int] = {}  # the checkpoint's files and their sizes

    def add(self, name: str, seconds: float) -> None:
        self.rows.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.rows[name])


def rotated(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def settle(cold: bool) -> None:
    """Flush dirty pages (so one method's writeback never lands in another's timing); drop the cache if cold."""
    gc.collect()
    os.sync()
    if cold:
        DROP_CACHES.write_text("3\n")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def fsync_write(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def compose_cfg(overrides: list[str], threads: int):
    from gpt2exp.composing import compose
    from gpt2exp.config import CONF_DIR
    from gpt2exp.resume import fix_values_of_record

    return fix_values_of_record(compose(CONF_DIR, ["logger=none", "device=cpu", *overrides]), threads)


# -- the 124M state ------------------------------------------------------------------------------


def build_state(cfg, seed: int, step: bool) -> dict:
    """Trainer's `stateful` for the gpt2_124m shape: model, AdamW, and the JSON-able state objects.

    With `step`, one optimizer step on a tiny batch fills AdamW's exp_avg / exp_avg_sq.
    """
    from transformers import GPT2LMHeadModel

    from gpt2exp.data import BatchSampler
    from gpt2exp.model import quiet_transformers, scratch_config
    from gpt2exp.optim import LRSchedule, build_optimizer
    from gpt2exp.state import RngState, TensorState, TrainerCounters
    from gpt2exp.trainer import next_token_loss

    quiet_transformers()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(scratch_config(cfg.model, GPT2_VOCAB, GPT2_VOCAB - 1))
    optimizer = build_optimizer(cfg.optimizer, model, "cpu")
    schedule = LRSchedule(optimizer, cfg.optimizer.lr, cfg.scheduler)
    block, batch = cfg.model.block_size, cfg.trainer.batch_size
    dummy_tokens = np.zeros(block * (batch + 2), dtype=np.uint16)  # only the sampler's position is saved
    counters = TrainerCounters()
    if step:
        schedule.apply(0)
        tokens = torch.randint(0, GPT2_VOCAB, (1, 17))
        next_token_loss(model, tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counters.step, counters.tokens_seen = 1, 16
    return {
        "model": model,
        "optimizer": TensorState(optimizer),
        "scaler": None,  # fp32 on CPU: Trainer passes no GradScaler
        "schedule": schedule,
        "sampler": BatchSampler(dummy_tokens, block, batch, cfg.seed),
        "trainer": counters,
        "rng": RngState(),
    }


# -- 1. save -------------------------------------------------------------------------------------


def bench_save(args, cfg, stateful, work: Path, timings: Timings, timed: bool) -> Path:
    """Times the three save methods (if `timed`); returns a committed checkpoint dir for the load section."""
    from omegaconf import OmegaConf

    from gpt2exp.checkpoint import CheckpointManager

    cold = args.cache == "cold"
    ckpt_cfg = OmegaConf.merge(cfg.checkpoint, {"every_steps": 0, "every_minutes": 0.0, "async_save": False})
    manager = CheckpointManager(ckpt_cfg, work / "manager")
    # an untimed save first: imports, allocator warm-up, and the files the other methods mirror
    reference = manager.save(1, stateful, {}, force=True).wait()
    files = {p.name: p.read_bytes() for p in sorted(reference.iterdir()) if p.is_file()}
    timings.files = {name: len(data) for name, data in files.items()}
    kept = work / "kept" / reference.name
    kept.parent.mkdir()
    os.rename(reference, kept)  # what the load section reads; out of the manager's way
    if not timed:
        manager.close()
        return kept
    sd, osd = stateful["model"].state_dict(), stateful["optimizer"].state_dict()

    def manager_save(out: Path, step: int) -> Callable[[], None]:
        return lambda: manager.save(step, stateful, {}, force=True).wait()

    def raw_write(out: Path, step: int) -> Callable[[], None]:
        def run() -> None:
            for name, data in files.items():
                fsync_write(out / name, data)

        return run

    def torch_save(out: Path, step: int) -> Callable[[], None]:
        def run() -> None:
            with open(out / "checkpoint.pt", "wb") as f:
                torch.save({"model": sd, "optimizer": osd}, f)
                f.flush()
                os.fsync(f.fileno())

        return run

    methods = {"save/manager": manager_save, "save/raw": raw_write, "save/torch": torch_save}
    step = 1
    try:
        for round_index in range(args.repeats):
            for name in rotated(list(methods), round_index):
                step += 1
                out = work / "raw"
                out.mkdir(exist_ok=True)
                run = methods[name](out, step)
                settle(cold)
                start = time.perf_counter()
                run()
                timings.add(name, time.perf_counter() - start)
                written = manager.root / f"step_{step:08d}" if name == "save/manager" else out
                timings.bytes[name] = dir_bytes(written)
                shutil.rmtree(written)  # untimed: the next method writes into free space as this one did
    finally:
        manager.close()
    return kept


# -- 2. load -------------------------------------------------------------------------------------


def bench_load(args, cfg, source_state, kept: Path, work: Path, timings: Timings) -> None:
    from omegaconf import OmegaConf

    from gpt2exp.checkpoint import CheckpointManager

    cold = args.cache == "cold"
    # a run dir whose checkpoints/ holds only the kept checkpoint, as after a save
    root = work / "load_run"
    (root / "checkpoints").mkdir(parents=True)
    target = root / "checkpoints" / kept.name
    os.rename(kept, target)
    managers = {
        mode: CheckpointManager(OmegaConf.merge(cfg.checkpoint, {"verify": mode, "async_save": False}), root)
        for mode in ("sha256", "size")
    }
    probe = "transformer.h.0.attn.c_attn.weight"
    expected = source_state["model"].state_dict()[probe].clone()
    expected_step = source_state["trainer"].step

    def manager_load(mode: str) -> Callable[[], None]:
        fresh = build_state(cfg, seed=4321, step=False)  # untimed: a fresh model and optimizer

        def run() -> None:
            loaded = managers[mode].load(fresh, target)
            if loaded.step != expected_step or not torch.equal(fresh["model"].state_dict()[probe], expected):
                raise SystemExit(f"error: the load with verify={mode} did not restore the saved state")
            if not fresh["optimizer"].obj.state:
                raise SystemExit(f"error: the load with verify={mode} did not restore the optimizer state")

        return run

    def raw_read() -> Callable[[], None]:
        def run() -> None:
            total = 0
            for path in sorted(target.iterdir()):
                with open(path, "rb") as f:
                    total += len(f.read())
            if total != dir_bytes(target):
                raise SystemExit("error: the plain read came up short")

        return run

    methods = {
        "load/sha256": lambda: manager_load("sha256"),
        "load/size": lambda: manager_load("size"),
        "load/raw": raw_read,
    }
    try:
        if not cold:
            raw_read()()  # every method then starts with the files in the page cache
        for round_index in range(args.repeats):
            for name in rotated(list(methods), round_index):
                run = methods[name]()
                settle(cold)
                start = time.perf_counter()
                run()
                timings.add(name, time.perf_counter() - start)
                del run
    finally:
        for manager in managers.values():
            manager.close()
    for name in methods:
        timings.bytes[name] = dir_bytes(target)
    shutil.rmtree(root)


# -- 3. blocked ----------------------------------------------------------------------------------


def bench_blocked(args, cfg, stateful, work: Path, timings: Timings) -> dict:
    """How long the loop is blocked per save: a synchronous save against a background one.

    The background save blocks for `save()` (the state frozen, the tensor copy started) plus
    `wait_snapshot()` before the next optimizer update, which here follows the next step's real
    forward and backward of the same model (batch 1 x --next-tokens): the copy runs beside it.
    """
    from omegaconf import OmegaConf

    from gpt2exp.checkpoint import CheckpointManager
    from gpt2exp.trainer import next_token_loss

    model = stateful["model"]
    tokens = torch.randint(0, GPT2_VOCAB, (1, args.next_tokens + 1))
    info: dict = {}

    def next_forward_backward() -> float:
        start = time.perf_counter()
        next_token_loss(model, tokens[:, :-1], tokens[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    managers = {
        mode: CheckpointManager(
            OmegaConf.merge(cfg.checkpoint, {"every_steps": 0, "every_minutes": 0.0, "async_save": mode == "async"}),
            work / f"blocked-{mode}",
        )
        for mode in ("sync", "async")
    }
    step = 1
    try:
        next_forward_backward()  # warm-up
        for round_index in range(args.repeats):
            for mode in rotated(list(managers), round_index):
                manager = managers[mode]
                step += 1
                settle(False)
                start = time.perf_counter()
                pending = manager.save(step, stateful, {}, force=True)
                if mode == "sync":
                    pending.wait()
                    blocked = time.perf_counter() - start
                else:
                    in_save = time.perf_counter() - start
                    info.setdefault("forward_backward", []).append(next_forward_backward())
                    start = time.perf_counter()
                    manager.wait_snapshot()
                    blocked = in_save + time.perf_counter() - start
                    commit_start = time.perf_counter()
                    pending.wait()  # untimed: the background commit, before the next round
                    info.setdefault("background_commit", []).append(time.perf_counter() - commit_start)
                timings.add(f"blocked/{mode}", blocked)
                shutil.rmtree(manager.root / f"step_{step:08d}")
    finally:
        for manager in managers.values():
            manager.close()
    return info


# -- 4. train ------------------------------------------------------------------------------------


def bench_train(args, work: Path, timings: Timings) -> dict:
    """Two trainers in one process take turns of --turn steps: one saves every --every-steps, one never.

    Taking turns puts the machine's drift (other processes, the host) on both alike, where two runs one
    after the other can differ by 10%. Each trainer keeps its own RNG state from turn to turn, so both
    compute the same values bit for bit (checked at the end): their step times may differ by their
    values (CPU kernels slow down on denormal floats), and here only the saves differ. The trainer
    with checkpoints ends each of its turns by waiting for a save in flight (`flush`), so its
    background work is charged to itself, never to the other. A round is --every-steps steps of each
    trainer (one save); it is printed when it ends.
    """
    from gpt2exp.trainer import Trainer

    total = args.warmup + args.steps
    variants = {"none": 0, "every": args.every_steps}
    trainers, run_dirs = {}, {}
    for name, every in variants.items():
        cfg = compose_cfg(
            [
                f"model={args.train_model}",
                f"trainer.batch_size={args.train_batch}",
                f"trainer.max_steps={total}",
                f"trainer.num_threads={args.threads}",
                "trainer.progress=false",
                f"checkpoint.every_steps={every}",
                "checkpoint.every_minutes=0",
                "checkpoint.save_final=false",  # the final save is not part of the steady cost
            ],
            args.threads,
        )
        run_dirs[name] = work / f"train-{name}"
        run_dirs[name].mkdir()
        trainers[name] = Trainer(cfg, run_dirs[name])
    in_save = dict.fromkeys(variants, 0.0)  # seconds inside save_if_due, the checkpoint's direct cost
    start_rng = trainers["none"].stateful["rng"].state_dict()  # both were seeded and built alike
    rng = dict.fromkeys(variants, start_rng)
    flushed = dict.fromkeys(variants, 0.0)  # seconds of the turns' closing waits for a save in flight

    def run_steps(name: str, count: int) -> float:
        trainer = trainers[name]
        trainer.stateful["rng"].load_state_dict(rng[name])
        start = time.perf_counter()
        for _ in range(count):
            trainer.step()
            save_start = time.perf_counter()
            trainer.save_if_due()
            in_save[name] += time.perf_counter() - save_start
        flush_start = time.perf_counter()
        trainer.checkpoints.flush()
        flushed[name] += time.perf_counter() - flush_start
        elapsed = time.perf_counter() - start
        rng[name] = trainer.stateful["rng"].state_dict()
        return elapsed

    try:
        for trainer in trainers.values():
            trainer.start_fresh()
        for name in variants:
            run_steps(name, args.warmup)
        in_save.update(dict.fromkeys(variants, 0.0))
        turns_per_round = args.every_steps // args.turn
        for round_index in range(args.steps // args.every_steps):
            seconds = dict.fromkeys(variants, 0.0)
            flushed.update(dict.fromkeys(variants, 0.0))
            for turn in range(turns_per_round):
                # the order alternates from turn to turn, and for the save's turn from round to round
                for name in rotated(list(variants), round_index + turn):
                    settle(False)  # what one trainer left (garbage, dirty pages) is not timed in the other's turn
                    seconds[name] += run_steps(name, args.turn)
            for name in variants:
                timings.add(f"train/{name}", seconds[name])
            print(
                f"train round {round_index + 1}: without checkpoints {seconds['none']:.2f} s, with "
                f"{seconds['every']:.2f} s, tokens/s with / without {seconds['none'] / seconds['every']:.3f} "
                f"(of which waiting for the save at the end of its turn: {flushed['every']:.2f} s)",
                flush=True,
            )
        timings.add("in_save/every", in_save["every"])
        timings.add("in_save/none", in_save["none"])
        weights = [trainer.model.state_dict() for trainer in trainers.values()]
        if any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0]):
            raise SystemExit("error: the two trainers ended with different weights: a save changed training")
        committed = {name: sorted(p.name for p in (run_dirs[name] / "checkpoints").glob("step_*")) for name in variants}
        expected = [f"step_{s:08d}" for s in range(args.warmup + 1, total + 1) if s % args.every_steps == 0]
        if committed["none"] or not committed["every"] or expected[-len(committed["every"]) :] != committed["every"]:
            raise SystemExit(f"error: the runs committed {committed}, not the newest of {expected} alone")
        return {
            "saves": len(expected),
            "checkpoint_mb": dir_bytes(run_dirs["every"] / "checkpoints" / committed["every"][-1]) / 1e6,
            "tokens": trainers["none"].tokens_per_step * args.every_steps,  # per round
            "model": (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size, cfg.trainer.batch_size),
        }
    finally:
        for trainer in trainers.values():
            trainer.checkpoints.close()


def save_position(args) -> int:
    """Which step of its trainer's turn each save is (1 = the first): the same for every save."""
    return (args.every_steps - args.warmup - 1) % args.turn + 1


# -- the report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args, timings: Timings, train_info: dict | None) -> None:
    labels = {
        "save/manager": "CheckpointManager.save (force, fsync, sha256)",
        "save/raw": "plain write+fsync of the same files",
        "save/torch": "torch.save({model, optimizer}) + fsync",
        "load/sha256": "CheckpointManager.load verify=sha256",
        "load/size": "CheckpointManager.load verify=size",
        "load/raw": "plain open+read of the same files",
        "blocked/sync": "loop blocked per save, async_save=false",
        "blocked/async": "loop blocked per save, async_save=true",
        "train/none": "train, checkpoint.every_steps=0",
        "train/every": f"train, checkpoint.every_steps={args.every_steps}",
    }
    width = max(len(v) for v in labels.values())
    print(f"{'method':<{width}}  {'median':>12}  {'rate':>14}  per round (s)")
    for key, label in labels.items():
        if key not in timings.rows:
            continue
        median = timings.median(key)
        rounds = " ".join(f"{v:.2f}" for v in timings.rows[key])
        if key in timings.bytes:
            rate = f"{timings.bytes[key] / median / 1e6:,.0f} MB/s"
        elif key.startswith("blocked/"):
            rate = ""
        else:
            rate = f"{train_info['tokens'] / median:,.0f} tok/s"  # type: ignore[index]
        print(f"{label:<{width}}  {median:>10.3f} s  {rate:>14}  {rounds}")
    if "save/manager" in timings.rows:
        ratio = timings.median("save/manager") / timings.median("save/raw")
        print(f"save / plain write     = {ratio:.2f}x  (target <= {SAVE_TARGET:.2f}x)  {verdict(ratio <= SAVE_TARGET)}")
        ref = timings.median("save/torch") / timings.median("save/raw")
        print(f"torch.save / plain write = {ref:.2f}x  (reference, no target)")
    for mode in ("sha256", "size"):
        if f"load/{mode}" in timings.rows:
            ratio = timings.median(f"load/{mode}") / timings.median("load/raw")
            ok = verdict(ratio <= LOAD_TARGET)
            print(f"load {mode:<6} / plain read = {ratio:.2f}x  (target <= {LOAD_TARGET:.2f}x)  {ok}")
    if "blocked/async" in timings.rows:
        ratio = timings.median("blocked/async") / timings.median("blocked/sync")
        ok = verdict(ratio <= BLOCKED_TARGET)
        print(f"blocked async / sync save = {ratio:.3f}  (target <= {BLOCKED_TARGET:.2f})  {ok}")
    if train_info is not None:
        rounds = list(zip(timings.rows["train/none"], timings.rows["train/every"], strict=True))
        none, every = sum(n for n, _ in rounds), sum(e for _, e in rounds)
        ratio = none / every  # tokens/s with / without, over all rounds
        print(
            f"train tokens/s with / without checkpoints = {ratio:.3f}  (target >= {TRAIN_TARGET:.2f})  "
            f"{verdict(ratio >= TRAIN_TARGET)}; rounds " + " ".join(f"{n / e:.3f}" for n, e in rounds)
        )
        in_save = timings.rows["in_save/every"][0]
        print(
            f"  (time inside save_if_due with checkpoints: {in_save:.2f} s = {100 * in_save / every:.2f}% of the "
            f"timed steps; without: {timings.rows['in_save/none'][0] * 1e3:.1f} ms)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from gpt2exp.config import register_schemas

    register_schemas()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpt2exp-ckpt-bench-", dir=args.workdir))
    timings = Timings()
    train_info = None
    try:
        if {"save", "load", "blocked"} & set(args.sections):
            cfg = compose_cfg(["model=gpt2_124m"], args.threads)
            state = build_state(cfg, seed=cfg.seed, step=True)
            params = sum(p.numel() for p in state["model"].parameters())
            kept = bench_save(args, cfg, state, work, timings, timed="save" in args.sections)
            files = ", ".join(f"{k} {v / 1e6:.1f}MB" for k, v in timings.files.items())
            print(
                f"gpt2_124m: {params / 1e6:.1f}M params fp32 + AdamW state; {args.threads} threads; "
                f"page cache {args.cache} before each timed save/read/load; {args.repeats} round(s); "
                f"workdir {work}\ncheckpoint files: {files}"
            )
            if "load" in args.sections:
                bench_load(args, cfg, state, kept, work, timings)
            if "blocked" in args.sections:
                blocked = bench_blocked(args, cfg, state, work, timings)
                print(
                    f"blocked: the next step's forward+backward (1 x {args.next_tokens} tokens) took "
                    + " ".join(f"{v:.2f}" for v in blocked["forward_backward"])
                    + " s; each background commit finished "
                    + " ".join(f"{v:.2f}" for v in blocked["background_commit"])
                    + " s after it"
                )
            del state
            gc.collect()
        if "train" in args.sections:
            train_info = bench_train(args, work, timings)
            n_layer, n_embd, block, batch = train_info["model"]
            print(
                f"train: {args.train_model} (n_layer {n_layer}, n_embd {n_embd}), batch {batch} x {block} tokens, "
                f"{args.warmup} warmup + {args.steps} timed steps each, in turns of {args.turn}; "
                f"checkpoint.every_steps={args.every_steps} ({train_info['saves']} saves in the timed steps, "
                f"{train_info['checkpoint_mb']:.1f} MB each, step {save_position(args)} of its turn) vs 0; "
                "page cache warm"
            )
        load1, load5, _ = os.getloadavg()
        print(f"load average at the end: {load1:.1f} (1 min), {load5:.1f} (5 min) on {os.cpu_count()} CPUs")
        report(args, timings, train_info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
