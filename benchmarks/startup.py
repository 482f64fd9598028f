"""Start-up of the command line: `python -m gpt2exp.train --cfg job` against a Hydra-only app.

    python benchmarks/startup.py                  # 7 interleaved rounds
    python benchmarks/startup.py --rounds 15

The Hydra-only app is the smallest `@hydra.main` program composing gpt2exp's own config tree
(conf/, schema included) and printing it: what any Hydra project pays before its own code. Both
run as whole processes from a temporary directory, alternately, and the table shows the median
wall time of each and the ratio of the medians; the target is gpt2exp <= 0.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HYDRA_ONLY_APP = """
import hydra
from omegaconf import OmegaConf

from gpt2exp.config import CONF_DIR, register_schemas


def show(cfg):
    print(OmegaConf.to_yaml(cfg))


if __name__ == "__main__":
    register_schemas()
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(show)()
"""
TARGET_S = 0.5


def wall(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (one untimed warm-up first)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpt2exp-startup-") as tmp:
        cwd = Path(tmp)
        (cwd / "hydra_only.py").write_text(HYDRA_ONLY_APP)
        commands = {
            "gpt2exp --cfg job": [sys.executable, "-m", "gpt2exp.train", "--cfg", "job"],
            "Hydra-only app": [sys.executable, "hydra_only.py", "--cfg", "job"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for command in commands.values():
            wall(command, cwd)  # warm the file cache
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(wall(command, cwd))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'command':<20} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, values in times.items():
        print(f"{name:<20} {medians[name]:>9.3f} {min(values):>7.3f} {max(values):>7.3f}")
    ratio = medians["gpt2exp --cfg job"] / medians["Hydra-only app"]
    verdict = "meets" if medians["gpt2exp --cfg job"] <= TARGET_S else "misses"
    print(
        f"gpt2exp / Hydra-only: {ratio:.2f}x; gpt2exp median {medians['gpt2exp --cfg job']:.3f} s {verdict} "
        f"the {TARGET_S} s target"
    )


if __name__ == "__main__":
    main()
