"""What a sweep costs: jobs in one process vs one process each, joblib in parallel, and sweep-resume planning.

Run from the repository root (CPU; the token cache is built before anything is timed):

    HF_HUB_OFFLINE=1 python benchmarks/sweeps.py
    python benchmarks/sweeps.py --jobs 2 --steps 10          # a quick check

Every method trains the same `--jobs` jobs (optimizer.lr swept over distinct values; the tiny model,
`--steps` steps, 1 torch thread each, no W&B) through the real CLI, each in a fresh temp dir:

1. basic: `python -m gpt2exp.train -m optimizer.lr=a,b,...` (Hydra's basic launcher, one process);
2. separate: one `python -m gpt2exp.train optimizer.lr=x` process per job, one after another;
3. joblib: the same sweep with `hydra/launcher=joblib hydra.launcher.n_jobs=2` (two worker processes);
4. resume plan: `resume=<the basic sweep's dir>` once every job is completed (reads the record,
   prints the per-job summary, starts nothing), against `--cfg job` (the CLI's start-up alone).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="jobs in the sweep")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per job")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    args = parser.parse_args(argv)
    if args.jobs < 2 or args.steps < 1 or args.batch_size < 1:
        parser.error("--jobs must be at least 2, --steps and --batch-size at least 1")
    return args


def job_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.eval_every={args.steps}",
        "trainer.num_threads=1",
        "trainer.num_samples=0",
        "trainer.progress=false",
        "logger=none",
    ]


def learning_rates(count: int) -> list[str]:
    return [f"{1e-3 * (i + 1):g}" for i in range(count)]


def timed(*cli_args: str, cwd: Path) -> float:
    """Seconds one `python -m gpt2exp.train ...` takes; fails loudly if the command fails."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gpt2exp.train", *cli_args], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"benchmark command failed ({' '.join(cli_args)}):\n{result.stderr[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base, lrs = job_overrides(args), learning_rates(args.jobs)
    sweep_arg = f"optimizer.lr={','.join(lrs)}"
    with tempfile.TemporaryDirectory(prefix="gpt2exp-bench-sweeps-") as tmp:
        root = Path(tmp)
        for name in ("warm", "basic", "separate", "joblib"):
            (root / name).mkdir()
        timed(*base, "trainer.max_steps=1", cwd=root / "warm")  # builds the token cache, untimed
        seconds = {
            "basic": timed("-m", "hydra.sweep.dir=sweep", *base, sweep_arg, cwd=root / "basic"),
            "separate": sum(
                timed(*base, f"optimizer.lr={lr}", f"hydra.run.dir=run{i}", cwd=root / "separate")
                for i, lr in enumerate(lrs)
            ),
            "joblib": timed(
                "-m",
                "hydra.sweep.dir=sweep",
                "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2",
                *base,
                sweep_arg,
                cwd=root / "joblib",
            ),
            "resume plan": timed("resume=sweep", cwd=root / "basic"),
            "--cfg job": timed("--cfg", "job", cwd=root / "basic"),
        }
    print(f"{args.jobs} jobs x {args.steps} steps (tiny GPT-2, batch {args.batch_size}, 1 thread per job)\n")
    print(f"{'method':<14} {'wall s':>8}")
    for name, value in seconds.items():
        print(f"{name:<14} {value:>8.2f}")
    ratios = (
        ("basic / separate processes", seconds["basic"] / seconds["separate"], "below 1: one process saves start-ups"),
        ("joblib n_jobs=2 / basic", seconds["joblib"] / seconds["basic"], "below 1: parallel jobs help"),
        ("resume plan / --cfg job", seconds["resume plan"] / seconds["--cfg job"], "the planning cost over start-up"),
    )
    print()
    for label, ratio, meaning in ratios:
        print(f"{label:<30} {ratio:.3f}  ({meaning})")


if __name__ == "__main__":
    main()
