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

Then pruning (`--part pruning`): an Optuna study of `--trials` trials (default 8) over
`optimizer.lr=tag(log, interval(1e-5, 3e-2))` with the random sampler at one seed, so that both
studies draw the same learning rates, run once with hydra/sweeper/pruner=median (2 start-up trials,
no pruning in a trial's first `--warmup` steps) and once with pruner=none (`--eval-every` steps
between the evaluations that are reported to the study). It
prints each study's total training steps (every trial's last step, from run.json), wall time and
best val loss (the study's best value), and the ratios pruned / unpruned: the point is fewer steps
for an equal best.

    python benchmarks/sweeps.py --part pruning                 # 8 trials x 30 steps
    python benchmarks/sweeps.py --part pruning --trials 4 --steps 10 --eval-every 2   # a quick check
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
    parser.add_argument("--part", choices=("all", "launchers", "pruning"), default="all", help="what to measure")
    parser.add_argument("--trials", type=int, default=8, help="trials of each Optuna study (pruning)")
    parser.add_argument("--eval-every", type=int, default=5, help="steps between reported evaluations (pruning)")
    parser.add_argument("--seed", type=int, default=0, help="the random sampler's seed (pruning)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="steps before a trial can be pruned (default: a third of --steps)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 2 or args.steps < 1 or args.batch_size < 1:
        parser.error("--jobs must be at least 2, --steps and --batch-size at least 1")
    if args.trials < 2 or not 1 <= args.eval_every < args.steps:
        parser.error("--trials must be at least 2 and --eval-every between 1 and --steps - 1")
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
    if args.part in ("all", "launchers"):
        launchers(args)
    if args.part in ("all", "pruning"):
        pruning(args)


def launchers(args: argparse.Namespace) -> None:
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
    print()


def study_totals(sweep_dir: Path, trials: int) -> tuple[int, float, list[str], str]:
    """(total training steps of all trials, the study's best value, each trial's status, the best trial)."""
    import json

    import yaml

    runs = [json.loads((sweep_dir / str(n) / "run.json").read_text()) for n in range(trials)]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    lr = best["best_params"]["optimizer.lr"]
    which = f"trial {best['best_trial']} (lr {lr:.3g})"
    return sum(int(r["step"]) for r in runs), float(best["best_value"]), [r["status"] for r in runs], which


def pruning(args: argparse.Namespace) -> None:
    """The same lr search with the median pruner and without: steps, wall time, best val loss."""
    base = [o for o in job_overrides(args) if not o.startswith("trainer.eval_every")]
    study = [
        "hydra/sweeper=gpt2exp_optuna",
        "hydra/sweeper/sampler=random",
        f"hydra.sweeper.sampler.seed={args.seed}",
        f"hydra.sweeper.n_trials={args.trials}",
        "optimizer.lr=tag(log, interval(1e-5, 3e-2))",
        "scheduler.warmup_steps=0",
        f"trainer.eval_every={args.eval_every}",
    ]
    warmup = args.steps // 3 if args.warmup is None else args.warmup
    pruners = {
        "median": [
            "hydra/sweeper/pruner=median",
            "hydra.sweeper.pruner.n_startup_trials=2",
            f"hydra.sweeper.pruner.n_warmup_steps={warmup}",
        ],
        "none": ["hydra/sweeper/pruner=none"],
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpt2exp-bench-pruning-") as tmp:
        root = Path(tmp)
        timed(*base, "trainer.max_steps=1", "hydra.run.dir=warm", cwd=root)  # builds the token cache, untimed
        for name, options in pruners.items():
            seconds = timed("-m", f"hydra.sweep.dir={name}", *base, *study, *options, cwd=root)
            results[name] = (*study_totals(root / name, args.trials), seconds)
    print(
        f"Optuna lr search: {args.trials} trials x {args.steps} steps, val/loss reported every {args.eval_every} "
        f"steps, random sampler seed {args.seed} (the same learning rates in both studies); median pruner: "
        f"2 start-up trials, no pruning before step {warmup}\n"
    )
    print(f"{'pruner':<8} {'total steps':>11} {'wall s':>8} {'best val loss':>14}  {'best':<22} trials")
    for name, (steps, best, statuses, which, seconds) in results.items():
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
        print(f"{name:<8} {steps:>11} {seconds:>8.2f} {best:>14.4f}  {which:<22} {counts}")
    (m_steps, m_best, _, _, m_wall), (n_steps, n_best, _, _, n_wall) = results["median"], results["none"]
    print()
    print(f"{'steps median / none':<30} {m_steps / n_steps:.3f}  (below 1: pruning trains fewer steps)")
    print(f"{'wall median / none':<30} {m_wall / n_wall:.3f}  (below 1: pruning saves time)")
    print(f"{'best val loss median - none':<30} {m_best - n_best:+.4f}  (0: the same best found)")


if __name__ == "__main__":
    main()
