"""What training on several processes costs: sharded checkpoint save/load against one process, step time
of 2 processes (DDP, FSDP2) against 1, and on a GPU tokens/s and MFU of DDP and FSDP against one process.

Run from the repository root (CPU, fp32; as root the page cache is dropped before every timed save and
load, otherwise both run warm; the token cache is built on first use):

    python benchmarks/distributed.py
    python benchmarks/distributed.py --repeats 1                       # a quick check
    python benchmarks/distributed.py --model gpt2_124m --batch-size 4  # a bigger state to write
    python benchmarks/distributed.py --sections gpu --gpu-device cpu --gpu-model gpt2_tiny  # smoke run of the GPU code

The script starts its own processes: each round of each way of running is one fresh launch of this file
as a worker, `python benchmarks/distributed.py --worker single ...` for one process and
`python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/distributed.py --worker ddp|fsdp ...`
for two; rank 0 writes what it measured to a JSON file (times are the slowest rank's).
Every worker builds gpt2exp's own `Trainer(cfg, run_dir)` + `start_fresh()` (--model, Shakespeare,
AdamW, `distributed=auto|ddp|fsdp`, checkpoint.async_save=false, the same global batch of --batch-size
sequences in every world) and then, in this order:

1. save: one `Trainer.step()` (AdamW state after one step), one untimed save (imports, allocator), its
   dir removed, then the timed `trainer.checkpoints.save(step, trainer.stateful, {}, force=True).wait()`
   of the same state: one process writes HFCheckpointFiles (model.safetensors, optimizer.pt, ...),
   2 processes ShardedCheckpointFiles (the weights once by rank 0, the optimizer through
   torch.distributed.checkpoint, each rank its own shard), all committed by the same CheckpointManager.
2. load: a second, fresh `Trainer` in the same world (untimed), then the timed
   `CheckpointManager.load(stateful, that checkpoint)` (verify as configured, sha256); the loaded weights
   and AdamW state are checked equal to the saved ones on every rank.
3. step: --warmup more untimed steps, then --steps timed `Trainer.step()` calls; one process runs
   --threads torch threads, each of 2 processes --threads / 2, so both use the same cores. Two processes
   each do half the batch with half the cores, then gloo all-reduces the gradients (DDP), or FSDP gathers
   parameters and reduce-scatters gradients, through memory: on an idle 2-core CPU they are no faster
   than one. A fourth way, one process with --threads / 2 threads, is run as a reference: on a busy
   machine a process's threads wait on each other, which one-thread processes escape.
4. gpu (only where `torch.cuda.is_available()`, else printed as skipped): tokens/s and MFU of
   --gpu-model (gpt2_124m, `+experiment=gpt2_124m`: bf16, fused AdamW, torch.compile) on the one GPU,
   the single-process loop against DDP and FSDP2 each launched by torchrun with --nproc_per_node=1
   (what the wrappers cost with nobody to talk to), --gpu-warmup untimed then --gpu-steps timed steps.

The four ways of running (three in the gpu section) take turns in a rotated order for --repeats
rounds; the table shows medians and every round. Read the rounds as well as the medians: other
processes on a shared machine can slow single rounds several-fold. Everything is written under a
fresh temporary dir (inside --workdir if given, else under $TMPDIR or /tmp) and removed at the end.

Distributed, measured on this 2-core CPU (torch 2.13.0, gpt2_mini 12.3M params + AdamW, 148 MB checkpoints,
default run, 3 rounds, page cache cold, load average 1.8 at the end):
- save: one process 0.226 s; DDP x2 sharded 0.278 s (1.23x); FSDP x2 sharded 0.439 s (1.95x)
- load: one process 0.269 s; DDP x2 0.344 s (1.28x); FSDP x2 0.414 s (1.54x)
- step (global batch 4 x 256): one process, 2 threads 0.562 s; DDP x2 0.580 s (1.03x); FSDP x2 0.706 s
  (1.26x); one process, 1 thread 0.936 s. An earlier run at load average 4-7 gave DDP x2 0.20x and
  FSDP x2 0.31x against an oversubscribed 2-thread process (5.9 s): read the half-threads row.
- gpu: not measured (no CUDA GPU here).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_options import DROP_CACHES, settle_sections_and_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from scratch or from the local cache

SCRIPT = Path(__file__).resolve()
SECTIONS = ("cpu", "gpu")  # cpu: save, load and step time; gpu: tokens/s and MFU
# CPU ways of running: strategy, processes, and whether each process gets half of --threads
WAYS = {
    "single": ("single", 1, False),
    "single_half": ("single", 1, True),
    "ddp": ("ddp", 2, True),
    "fsdp": ("fsdp", 2, True),
}
LABELS = {"single": "one process", "single_half": "one process, half threads", "ddp": "DDP x2", "fsdp": "FSDP x2"}
GPU_WAYS = {"single": ("single", 1, False), "ddp": ("ddp", 1, False), "fsdp": ("fsdp", 1, False)}
GPU_LABELS = {"single": "one process", "ddp": "DDP x1 (torchrun)", "fsdp": "FSDP x1 (torchrun)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each way of running, interleaved")
    parser.add_argument("--model", default="gpt2_mini", help="the model preset of the save, load and step sections")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch in sequences (even: 2 processes)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round of the step section")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (after the first step)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in all (each of 2 processes: half)")
    parser.add_argument("--gpu-model", default="gpt2_124m", help="the model preset of the gpu section")
    parser.add_argument("--gpu-batch-size", type=int, default=16, help="gpu section: sequences per step")
    parser.add_argument("--gpu-steps", type=int, default=30, help="gpu section: timed steps per round")
    parser.add_argument("--gpu-warmup", type=int, default=5, help="gpu section: untimed steps first (compilation)")
    parser.add_argument(
        "--gpu-device", choices=("cuda", "cpu"), default="cuda", help="gpu section's device; cpu: a smoke run"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (a temp dir is made inside)")
    parser.add_argument(
        "--cache",
        choices=("auto", "cold", "warm"),
        default="auto",
        help="page cache before each timed save/load: cold drops it (root only); auto = cold if allowed",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS)
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds one worker launch may take")
    # a worker: one round of one way of running (started by the main process)
    parser.add_argument("--worker", choices=("single", "ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=SECTIONS, default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("repeats", "batch_size", "steps", "threads", "gpu_batch_size", "gpu_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "gpu_warmup"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")
    if args.batch_size % 2:
        parser.error(f"--batch-size {args.batch_size} cannot be split over 2 processes; give an even number")
    settle_sections_and_cache(parser, args, SECTIONS)
    return args


# -- helpers -------------------------------------------------------------------------------------


def rotated(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def tree_bytes(path: Path) -> tuple[int, int]:
    """Bytes and number of the files under `path` (a sharded checkpoint has subdirs)."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def compose_cfg(overrides: list[str], threads: int):
    from gpt2exp.composing import compose
    from gpt2exp.config import CONF_DIR, register_schemas
    from gpt2exp.resume import fix_values_of_record

    register_schemas()
    return fix_values_of_record(compose(CONF_DIR, ["logger=none", *overrides]), threads)


def distributed_override(way: str) -> str:
    return "distributed=auto" if way == "single" else f"distributed={way}"


# -- the worker: one round of one way of running -------------------------------------------------


def settle(cold: bool) -> None:
    """Rank 0 flushes dirty pages (and drops the cache if cold); every rank then starts together."""
    from gpt2exp.distributed import barrier, world_from_env

    gc.collect()
    if world_from_env().main:
        os.sync()
        if cold:
            DROP_CACHES.write_text("3\n")
    barrier()


def slowest(seconds: float) -> float:
    """The slowest rank's time: the world is done when its last rank is."""
    from gpt2exp.distributed import gather_to_all

    return max(gather_to_all(seconds))


def full_tensors(model) -> dict:
    """The whole weights on every rank (FSDP2's shards gathered: a collective, every rank calls it)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()
    }


def local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def same_state(saved, loaded) -> bool:
    """Whether `loaded` (a fresh Trainer after load) holds `saved`'s weights and this rank's AdamW state."""
    import torch

    from gpt2exp.distributed import any_rank

    a, b = full_tensors(saved.model), full_tensors(loaded.model)
    ok = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    params_a, params_b = list(saved.model.parameters()), list(loaded.model.parameters())
    for pa, pb in zip(params_a, params_b, strict=True):
        sa, sb = saved.optimizer.state.get(pa, {}), loaded.optimizer.state.get(pb, {})
        if not sa or sa.keys() != sb.keys():
            ok = False
            break
        ok = ok and all(torch.equal(local(sa[k]).cpu(), local(sb[k]).cpu()) for k in sa)
    return not any_rank(not ok)


def cpu_round(args, way: str) -> dict:
    """Save, load and step time of `way` in this world (see the module docstring, 1-3)."""
    from gpt2exp.checkpoint import step_dir_name
    from gpt2exp.distributed import barrier, world_from_env
    from gpt2exp.trainer import Trainer

    world = world_from_env()
    threads = args.threads  # a worker's --threads: this process's own
    cfg = compose_cfg(
        [
            f"model={args.model}",
            "device=cpu",
            distributed_override(way),
            f"trainer.batch_size={args.batch_size}",
            "trainer.grad_accum_steps=1",
            f"trainer.max_steps={1 + args.warmup + args.steps}",
            f"trainer.num_threads={threads}",
            "trainer.progress=false",
            "trainer.eval_every=0",
            "trainer.num_samples=0",
            "checkpoint.async_save=false",
            "checkpoint.every_steps=0",
            "checkpoint.every_minutes=0",
            "checkpoint.save_final=false",
        ],
        threads,
    )
    cold = args.cache == "cold"
    trainer = Trainer(cfg, args.run_dir)
    trainer.start_fresh()
    trainer.step()  # AdamW's exp_avg / exp_avg_sq exist from here
    step = trainer.counters.step
    manager = trainer.checkpoints
    manager.save(step, trainer.stateful, {}, force=True).wait()  # untimed: imports, first-use costs
    if world.main:
        shutil.rmtree(manager.root / step_dir_name(step))
    settle(cold)
    start = time.perf_counter()
    path = manager.save(step, trainer.stateful, {}, force=True).wait()
    save_s = slowest(time.perf_counter() - start)
    if path is None:
        raise SystemExit("error: the timed save committed no checkpoint")
    checkpoint_bytes, checkpoint_files = tree_bytes(path)

    fresh = Trainer(cfg, args.run_dir)  # untimed: a freshly built model, optimizer and state objects
    settle(cold)
    start = time.perf_counter()
    loaded = fresh.checkpoints.load(fresh.stateful, path)
    load_s = slowest(time.perf_counter() - start)
    if loaded.step != step or not same_state(trainer, fresh):
        raise SystemExit(f"error: the {way} load did not restore the saved weights and optimizer state")
    fresh.checkpoints.close()
    del fresh, loaded
    gc.collect()

    for _ in range(args.warmup):
        trainer.step()
    barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()  # ends with the ranks' mean loss: every rank has finished the step
    step_s = slowest(time.perf_counter() - start) / args.steps
    manager.close()
    return {
        "save_s": save_s,
        "load_s": load_s,
        "step_s": step_s,
        "tokens_per_step": trainer.tokens_per_step,
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_files": checkpoint_files,
        "params": sum(p.numel() for p in trainer.model.parameters()),  # FSDP2's DTensors count whole
        "threads": threads,
        "world": world.size,
        "shape": [cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size],
    }


def gpu_round(args, way: str) -> dict:
    """Tokens/s and MFU of `way` on the one device (see the module docstring, 4)."""
    import torch

    from gpt2exp.mfu import mfu
    from gpt2exp.trainer import Trainer

    cfg = compose_cfg(
        [
            "+experiment=gpt2_124m",
            f"model={args.gpu_model}",
            f"device={args.gpu_device}",
            distributed_override(way),
            f"trainer.batch_size={args.gpu_batch_size}",
            "trainer.grad_accum_steps=1",
            f"trainer.max_steps={args.gpu_warmup + args.gpu_steps}",
            "trainer.progress=false",
            "trainer.num_samples=0",
        ],
        torch.get_num_threads(),
    )
    trainer = Trainer(cfg, args.run_dir)
    trainer.start_fresh()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(args.gpu_warmup):
        trainer.step()
    sync()
    start = time.perf_counter()
    for _ in range(args.gpu_steps):
        trainer.step()
    sync()
    elapsed = slowest(time.perf_counter() - start)
    trainer.checkpoints.close()
    tokens_per_s = trainer.tokens_per_step * args.gpu_steps / elapsed
    name = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, trainer.flops_per_token, trainer.peak_flops),
        "device": name,
        "precision": trainer.cfg.trainer.precision,  # what ran (config_as_run: no compile off CUDA)
        "compile": bool(trainer.cfg.trainer.compile),
        "tokens_per_step": trainer.tokens_per_step,
    }


def worker(args) -> int:
    import torch

    from gpt2exp.distributed import destroy_process_group, init_process_group, world_from_env

    world = world_from_env()
    torch.set_num_threads(args.threads)
    init_process_group(world)
    try:
        result = gpu_round(args, args.worker) if args.part == "gpu" else cpu_round(args, args.worker)
        if world.main:
            args.out.write_text(json.dumps(result))
    finally:
        destroy_process_group()
    return 0


# -- the main process: launches, rounds, the report ----------------------------------------------


def launch(args, part: str, way: tuple[str, int, bool], work: Path, name: str) -> dict:
    """One fresh worker launch of `way` (torchrun unless it is the plain one-process loop); its JSON."""
    strategy, nproc, half = way
    run_dir, out = work / name, work / f"{name}.json"
    run_dir.mkdir()
    command = [sys.executable]
    if strategy != "single":
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [str(SCRIPT), "--worker", strategy, "--part", part, "--out", str(out), "--run-dir", str(run_dir)]
    threads = max(1, args.threads // 2) if half else args.threads  # each process's own
    command += ["--threads", str(threads)]
    for flag in ("model", "batch_size", "steps", "warmup", "cache"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for flag in ("gpu_model", "gpu_batch_size", "gpu_steps", "gpu_warmup", "gpu_device"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not out.is_file():
        lines = (done.stdout + done.stderr).strip().splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), len(lines) - 25)
        tail = "\n".join(lines[max(first, 0) :][:40])  # the first rank's traceback, not torchrun's summary
        raise SystemExit(f"error: the {part} worker '{strategy}' x{nproc} failed (exit {done.returncode}):\n{tail}")
    shutil.rmtree(run_dir)
    result = json.loads(out.read_text())
    result["launch_s"] = wall
    return result


def run_rounds(args, part: str, ways: dict[str, tuple[str, int, bool]], work: Path) -> dict[str, list[dict]]:
    rounds: dict[str, list[dict]] = {way: [] for way in ways}
    for round_index in range(args.repeats):
        for way in rotated(list(ways), round_index):
            rounds[way].append(launch(args, part, ways[way], work, f"{part}-{way}-{round_index}"))
    return rounds


def median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def per_round(rounds: list[dict], key: str, fmt: str = "{:.2f}") -> str:
    return " ".join(fmt.format(r[key]) for r in rounds)


def report_cpu(args, rounds: dict[str, list[dict]]) -> None:
    one = rounds["single"][0]
    n_layer, n_embd, block = one["shape"]
    print(
        f"{args.model}: {one['params'] / 1e6:.1f}M params (n_layer {n_layer}, n_embd {n_embd}), fp32 + AdamW "
        f"state; global batch {args.batch_size} x {block} tokens in every world; torch threads: one process "
        f"{rounds['single'][0]['threads']} (half threads: {rounds['single_half'][0]['threads']}), each of 2 "
        f"processes {rounds['ddp'][0]['threads']}; "
        f"page cache {args.cache} before each timed save/load; {args.repeats} round(s)"
    )
    for way, label in LABELS.items():
        r = rounds[way][0]
        launches = per_round(rounds[way], "launch_s", "{:.0f}")
        print(
            f"  checkpoint of {label}: {r['checkpoint_bytes'] / 1e6:.1f} MB in {r['checkpoint_files']} files; "
            f"a whole launch took {launches} s"
        )
    rows = []
    for section, key in (("save", "save_s"), ("load", "load_s"), ("step", "step_s")):
        for way, label in LABELS.items():
            rows.append((f"{section}, {label}", way, key))
    width = max(len(r[0]) for r in rows)
    print(f"{'method':<{width}}  {'median':>10}  {'rate':>14}  per round (s)")
    for label, way, key in rows:
        m = median(rounds[way], key)
        if key == "step_s":
            rate = f"{rounds[way][0]['tokens_per_step'] / m:,.0f} tok/s"
        else:
            rate = f"{rounds[way][0]['checkpoint_bytes'] / m / 1e6:,.0f} MB/s"
        print(f"{label:<{width}}  {m:>8.3f} s  {rate:>14}  {per_round(rounds[way], key, '{:.3f}')}")
    for section, key in (("save", "save_s"), ("load", "load_s"), ("step", "step_s")):
        for base_way in ("single", "single_half") if section == "step" else ("single",):
            base = median(rounds[base_way], key)
            ratios = "   ".join(
                f"{LABELS[way]} / {LABELS[base_way]} = {median(rounds[way], key) / base:.2f}x"
                for way in ("ddp", "fsdp")
            )
            print(f"{section:<4} time  {ratios}")
    load1, _, _ = os.getloadavg()
    cores = os.cpu_count()
    slower = [LABELS[w] for w in ("ddp", "fsdp") if median(rounds[w], "step_s") > median(rounds["single"], "step_s")]
    print(
        f"step time: 2 processes share the {cores} cores one process uses, each with half the threads, and add "
        "the gradient all-reduce (DDP) or parameter all-gather + gradient reduce-scatter (FSDP) over gloo. "
        + (f"Here {' and '.join(slower)} were slower than one process. " if slower else "")
        + (
            f"Where 2 processes look faster, read the half-threads row: with a load average of {load1:.1f} on "
            f"{cores} CPUs one process's threads wait on each other (oversubscribed), and 2 one-thread processes "
            "escape that, not because 2 processes compute faster. "
            if len(slower) < 2
            else ""
        )
        + "Multi-process speed belongs on GPUs."
    )


def report_gpu(args, rounds: dict[str, list[dict]]) -> None:
    first = rounds["single"][0]
    smoke = " (a smoke run of the code on the CPU: no MFU, not a figure)" if args.gpu_device == "cpu" else ""
    print(
        f"gpu: {args.gpu_model} on {first['device']}{smoke}, {first['precision']}, compile {first['compile']}, "
        f"{first['tokens_per_step']:,} tokens per step, {args.gpu_warmup} warmup + {args.gpu_steps} timed steps, "
        f"{args.repeats} round(s)"
    )
    width = max(len(v) for v in GPU_LABELS.values())
    print(f"{'method':<{width}}  {'tokens/s':>12}  {'MFU':>6}  per round (tokens/s)")
    for way, label in GPU_LABELS.items():
        tps = median(rounds[way], "tokens_per_s")
        mfus = [r["mfu"] for r in rounds[way] if r["mfu"] is not None]
        mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a"
        print(f"{label:<{width}}  {tps:>12,.0f}  {mfu:>6}  {per_round(rounds[way], 'tokens_per_s', '{:,.0f}')}")
    base = median(rounds["single"], "tokens_per_s")
    print(
        "tokens/s "
        + "   ".join(
            f"{GPU_LABELS[way]} / one process = {median(rounds[way], 'tokens_per_s') / base:.3f}"
            for way in ("ddp", "fsdp")
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpt2exp-dist-bench-", dir=args.workdir))
    try:
        if "cpu" in args.sections:
            report_cpu(args, run_rounds(args, "cpu", WAYS, work))
        if "gpu" in args.sections:
            if args.gpu_device == "cuda" and not torch.cuda.is_available():
                print(
                    "gpu: skipped: torch.cuda.is_available() is False here (no CUDA GPU, or a CPU-only torch "
                    f"{torch.__version__}); run this file on a GPU machine for tokens/s and MFU of DDP and FSDP"
                )
            else:
                report_gpu(args, run_rounds(args, "gpu", GPU_WAYS, work))
        load1, load5, _ = os.getloadavg()
        print(f"load average at the end: {load1:.1f} (1 min), {load5:.1f} (5 min) on {os.cpu_count()} CPUs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
