"""Summarise finished (or running) runs: a markdown report with one table row per run, and plots.

    python -m gpt2exp.report outputs/<date>/<time>            # one run: writes into the run dir
    python -m gpt2exp.report multirun/<date>/<time>           # a sweep: one row per job, writes into the sweep dir
    python -m gpt2exp.report DIR DIR ... [--out reports/cmp]  # several: writes into --out (default: the current dir)
    python -m gpt2exp.report --help

Writes report.md (the table and the plots) and loss_vs_step.png, loss_vs_tokens.png, lr.png and
throughput.png, and prints the table. A dir is searched for run dirs (config.yaml + run.json) up to
three levels down (not into checkpoints/, wandb/ or hidden dirs). Runs are labelled by the Hydra
overrides that differ between them (from each run's .hydra/overrides.yaml), else by logger.name,
else by their dir name; resume points are dotted vertical lines. A dir passed that holds no run
(e.g. one left by a launch that stopped before its run began), or a file, is skipped with a note on
stderr, as long as another one holds runs. Exit code 2 for bad input.

For an Optuna study's sweep dir (hydra/sweeper=gpt2exp_optuna) it also writes
optimization_history.png and param_importances.png (Optuna's matplotlib plots) and a line on the
study; the status column says `pruned` for the trials its pruner stopped.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from gpt2exp import cli
from gpt2exp.errors import UserError, fail
from gpt2exp.rundir import (
    CHECKPOINTS,
    CONFIG_OF_RECORD,
    RUN_JSON,
    is_run_dir,
    read_run_json,
    run_status,
    timestamp,
)
from gpt2exp.sweep import task_overrides
from gpt2exp.tracking import read_metrics

REPORT = "report.md"
PLOTS = ("loss_vs_step.png", "loss_vs_tokens.png", "lr.png", "throughput.png")
MAX_DEPTH = 3
SKIP_DIRS = {CHECKPOINTS, "wandb", "tokenizer"}
LINE_STYLES: tuple[dict[str, Any], ...] = ({"linestyle": "-"}, {"linestyle": "--", "marker": "o", "markersize": 4})
COLUMNS = ("run", "overrides", "final val loss", "best val loss", "steps", "tokens", "wall time", "status", "resumes")


@dataclass
class Run:
    path: Path
    name: str = ""  # dir relative to the runs' common parent
    overrides: list[str] = field(default_factory=list)
    varying: list[str] = field(default_factory=list)  # the overrides not shared by every run
    label: str = ""  # legend label: the varying overrides, else logger.name, else the name
    info: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    job_name: str | None = None


# -- finding and reading runs --------------------------------------------------------------------


def find_runs(root: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """Run dirs at or under `root`, at most `depth` levels down; a run dir's own subdirs are not searched."""
    if is_run_dir(root):
        return [root]
    if depth == 0:
        return []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    found = []
    for child in children:
        if child.name in SKIP_DIRS or child.name.startswith("."):
            continue
        found.extend(find_runs(child, depth - 1))
    return found


def natural_key(text: str) -> list[Any]:
    """Sort job dirs 2 before 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides of a run, without hydra.* and resume=."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    return task_overrides([str(o) for o in overrides])


def read_job_name(run_dir: Path) -> str | None:
    try:
        cfg = yaml.safe_load((run_dir / CONFIG_OF_RECORD).read_text()) or {}
        name = (cfg.get("logger") or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return str(name) if name else None


def load_run(run_dir: Path) -> Run:
    try:
        info = read_run_json(run_dir)
        info["status"] = run_status(run_dir)  # a killed run reads `interrupted`, not `running`
    except (OSError, ValueError, UserError):  # UserError: a damaged run.json; the report lists the dir without it
        info = {}
    return Run(
        path=run_dir,
        overrides=read_overrides(run_dir),
        info=info if isinstance(info, dict) else {},
        rows=read_metrics(run_dir),
        job_name=read_job_name(run_dir),
    )


def collect_runs(dirs: Sequence[Path]) -> list[Run]:
    """Every run under `dirs`, named relative to their common parent and labelled by what differs."""
    paths: list[Path] = []
    skipped: dict[Path, str] = {}  # why: `report outputs/*` passes the files beside the runs too
    for root in dirs:
        if not root.exists():
            raise UserError(f"path does not exist: {root}; pass a run dir or a multirun dir")
        found = find_runs(root.resolve()) if root.is_dir() else []
        if not found:
            skipped[root] = (
                f"no gpt2exp run in it (no {CONFIG_OF_RECORD} and {RUN_JSON})" if root.is_dir() else "a file"
            )
        paths.extend(p for p in found if p not in paths)
    if not paths:
        raise UserError(
            f"no gpt2exp runs under {', '.join(map(str, skipped))}; pass a run dir (with {CONFIG_OF_RECORD} and "
            f"{RUN_JSON}) or a multirun dir"
        )
    for root, why in skipped.items():
        print(f"note: skipping {root}: {why}", file=sys.stderr)
    # several runs: below their common parent (sweep jobs are `0`, `1`...); one run: below the dir passed, or its parent
    base = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    if len(dirs) == 1 and len(paths) == 1 and paths[0] != dirs[0].resolve():
        base = dirs[0].resolve()
    runs = [load_run(p) for p in paths]
    for run in runs:
        run.name = run.path.relative_to(base).as_posix()
    runs.sort(key=lambda run: natural_key(run.name))
    shared = set(common_overrides(runs))
    for run in runs:
        run.varying = [o for o in run.overrides if o not in shared]
        run.label = ", ".join(run.varying) or run.job_name or run.name
    return runs


def common_overrides(runs: Sequence[Run]) -> list[str]:
    """The overrides every one of several runs shares (shown once, above the table); none for one run."""
    if len(runs) < 2:
        return []
    shared = set.intersection(*(set(run.overrides) for run in runs))
    return [o for o in runs[0].overrides if o in shared]


# -- numbers -------------------------------------------------------------------------------------


def series(rows: Iterable[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of the rows that carry numbers under both `x` and `key`."""
    pairs = [(row.get(x), row.get(key)) for row in rows if isinstance(row, dict)]
    pairs = [(float(a), float(b)) for a, b in pairs if is_number(a) and is_number(b)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def final_val_loss(rows: Sequence[dict[str, Any]]) -> float | None:
    """val/loss of the last row that carries one (NaN if that evaluation diverged)."""
    values = series(rows, "val/loss")[1]
    return values[-1] if values else None


def best_val_loss(rows: Sequence[dict[str, Any]]) -> float | None:
    values = [v for v in series(rows, "val/loss")[1] if not math.isnan(v)]
    return min(values) if values else None


def last_value(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """The last finite number logged under `key`."""
    values = [v for v in series(rows, key, x=key)[1] if math.isfinite(v)]
    return values[-1] if values else None


def best_run(runs: Sequence[Run]) -> Run | None:
    """The run with the lowest final val loss; a NaN or missing loss is never best."""
    scored = [(loss, i) for i, run in enumerate(runs) if (loss := final_val_loss(run.rows)) is not None]
    scored = [(loss, i) for loss, i in scored if math.isfinite(loss)]
    return runs[min(scored)[1]] if scored else None


def use_log_scale(values: Iterable[float]) -> bool:
    """Log y when the finite values span more than a decade (max/min > 10) and all are positive."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) > 10


def parse_time(stamp: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(stamp))
    except ValueError:
        return None


def wall_seconds(info: dict[str, Any]) -> float | None:
    """ended_at - started_at; both are local time, so a UTC offset on one only is dropped."""
    start, end = parse_time(info.get("started_at")), parse_time(info.get("ended_at"))
    if start is None or end is None:
        return None
    if (start.tzinfo is None) != (end.tzinfo is None):
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    return (end - start).total_seconds()


def format_duration(seconds: float | None) -> str:
    """106 -> `1m 46s`; 3725 -> `1h 2m 5s`; None -> `-`."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def format_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_resumes(info: dict[str, Any]) -> str:
    """`0`, or the count and the steps: `2 (steps 20, 40)`."""
    steps = resume_steps(info)
    if not steps:
        return "0"
    return f"{len(steps)} (step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))})"


def resume_steps(info: dict[str, Any]) -> list[int]:
    resumes = info.get("resumes") or []
    return [int(r["step"]) for r in resumes if isinstance(r, dict) and is_number(r.get("step"))]


# -- the table -----------------------------------------------------------------------------------


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    best = best_run(runs) if len(runs) > 1 else None
    rows = []
    for run in runs:
        steps, tokens = last_value(run.rows, "step"), last_value(run.rows, "tokens")
        row = [
            run.name,
            ", ".join(run.varying) or "-",
            format_loss(final_val_loss(run.rows)),
            format_loss(best_val_loss(run.rows)),
            "-" if steps is None else str(int(steps)),
            "-" if tokens is None else f"{int(tokens):,}",
            format_duration(wall_seconds(run.info)),
            str(run.info.get("status", "-")),
            format_resumes(run.info),
        ]
        if len(runs) > 1:
            row.append("**best**" if run is best else "")
        rows.append(row)
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A padded markdown table (readable as plain text too); numeric columns right-aligned."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [list(header), *rows]]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]
    right = {"final val loss", "best val loss", "steps", "tokens", "wall time"}
    rule = [("-" * (w - 1) + ":") if h in right else "-" * w for h, w in zip(header, widths, strict=True)]

    def line(row: Sequence[str]) -> str:
        padded = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(row, widths, header, strict=True)]
        return "| " + " | ".join(padded) + " |"

    return "\n".join([line(cells[0]), line(rule), *(line(row) for row in cells[1:])])


def report_table(runs: Sequence[Run]) -> str:
    header = [*COLUMNS, "best"] if len(runs) > 1 else list(COLUMNS)
    return markdown_table(header, table_rows(runs))


# -- plots ---------------------------------------------------------------------------------------


def tokens_at(rows: Sequence[dict[str, Any]], steps: Sequence[float]) -> list[float]:
    """Tokens seen at each step, interpolated from the rows that log `tokens` (0 at step 0)."""
    import numpy as np

    xs, ys = series(rows, "tokens")
    xs, ys = [0.0, *xs], [0.0, *ys]
    return [float(v) for v in np.interp(steps, xs, ys)] if len(xs) > 1 else []


def plot_runs(runs: Sequence[Run], path: Path, x: str, metrics: Sequence[str], ylabel: str, title: str) -> None:
    """One figure, one colour per run: `metrics[0]` solid, any `metrics[1]` dashed with markers, resumes dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    plotted: list[float] = []
    handles: list[Any] = []
    for i, run in enumerate(runs):
        color = cmap(i % cmap.N)
        label: str | None = run.label  # on the run's first line only
        for key, style in zip(metrics, LINE_STYLES, strict=False):
            xs, ys = series(run.rows, key)
            if x == "tokens":
                xs = tokens_at(run.rows, xs)
            if xs:
                (line,) = ax.plot(xs, ys, color=color, label=label, **style)
                handles += [line] if label else []
                label = None
                plotted += ys
        for step in resume_steps(run.info):
            at = tokens_at(run.rows, [step]) if x == "tokens" else [step]
            if not at:
                continue
            prefix = f"{run.label}: " if len(runs) > 1 else ""
            handles.append(
                ax.axvline(at[0], color=color, linestyle=":", linewidth=1.5, label=f"{prefix}resumed at step {step}")
            )
    if len(metrics) > 1 and plotted:
        legend = zip(("train loss", "val loss"), LINE_STYLES, strict=True)
        handles += [Line2D([], [], color="black", label=name, **style) for name, style in legend]
    if not metrics[0].endswith("loss"):
        ax.set_ylim(bottom=0)
    elif use_log_scale(plotted):
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.6, 1, 2 rather than 6x10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel({"step": "step (optimizer steps)", "tokens": "tokens seen"}[x])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if not plotted:
        ax.text(0.5, 0.5, "no data logged yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    if handles:
        outside = len(handles) > 8
        ax.legend(
            handles=handles,
            fontsize="small",
            loc="upper left" if outside else "best",
            bbox_to_anchor=(1.02, 1) if outside else None,
        )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_plots(runs: Sequence[Run], out: Path) -> None:
    loss, nats = ("train/loss", "val/loss"), "loss (cross-entropy, nats/token)"
    plot_runs(runs, out / PLOTS[0], "step", loss, nats, "Loss vs step (train solid, val dashed)")
    plot_runs(runs, out / PLOTS[1], "tokens", loss, nats, "Loss vs tokens seen (train solid, val dashed)")
    plot_runs(runs, out / PLOTS[2], "step", ("lr",), "learning rate", "Learning rate schedule")
    plot_runs(runs, out / PLOTS[3], "step", ("tokens_per_s",), "throughput (tokens/s)", "Training throughput")


# -- the report ----------------------------------------------------------------------------------


def sweep_overrides(dirs: Sequence[Path]) -> list[str]:
    """The sweep command's task overrides, from a multirun dir's multirun.yaml (empty if none)."""
    from gpt2exp.sweep import is_sweep_dir, read_sweep_record

    if len(dirs) != 1 or not is_sweep_dir(dirs[0]):
        return []
    try:
        return read_sweep_record(dirs[0]).task_overrides
    except UserError:  # an unreadable record: the report is still useful without it
        return []


# -- an Optuna study -----------------------------------------------------------------------------

STUDY_PLOTS = ("optimization_history.png", "param_importances.png")


def study_of(dirs: Sequence[Path]) -> Any:
    """The Optuna study kept in the one sweep dir passed, or None (not a study, or no database yet)."""
    from gpt2exp.study import DB_NAME, OPTUNA_SWEEPER, load_recorded_study
    from gpt2exp.sweep import is_sweep_dir, read_sweep_record

    if len(dirs) != 1 or not is_sweep_dir(dirs[0]):
        return None
    try:
        record = read_sweep_record(dirs[0])
        if record.sweeper != OPTUNA_SWEEPER or not (dirs[0] / DB_NAME).exists():
            return None
        return load_recorded_study(record)
    except UserError as exc:
        print(f"note: no study plots: {exc}", file=sys.stderr)
        return None


def write_study_plots(study: Any, out: Path) -> list[str]:
    """Optimisation history and parameter importance; returns report.md's lines for them."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    trials = study.get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in trials]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    lines = [f"Study `{study.study_name}`: {len(trials)} trials ({counts})."]
    if complete:
        best = study.best_trial
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
        lines[0] += f" Best: trial {best.number}, value {best.value:.4f} ({params})."
    lines.append("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        ax = plot_optimization_history(study)
        ax.figure.savefig(out / STUDY_PLOTS[0], dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
        lines += ["## Optimisation history", "", f"![Optimisation history]({STUDY_PLOTS[0]})", ""]
        lines += ["## Parameter importance", ""]
        if len(complete) >= 2 and len(complete[0].params) >= 1:
            ax = plot_param_importances(study)
            ax.figure.savefig(out / STUDY_PLOTS[1], dpi=110, bbox_inches="tight")
            plt.close(ax.figure)
            lines += [f"![Parameter importance]({STUDY_PLOTS[1]})", ""]
        else:
            (out / STUDY_PLOTS[1]).unlink(missing_ok=True)
            lines += [f"Needs at least 2 completed trials; the study has {len(complete)}.", ""]
    return lines


def render_report(dirs: Sequence[Path], runs: Sequence[Run], table: str, study_lines: Sequence[str] = ()) -> str:
    what = ", ".join(str(d) for d in dirs)
    lines = [
        f"# gpt2exp report: {what}",
        "",
        f"Generated {timestamp()}; {len(runs)} run{'s' if len(runs) != 1 else ''}.",
        "",
    ]
    if sweep := sweep_overrides(dirs):
        lines += [f"Sweep: `{' '.join(sweep)}`", ""]
    if shared := common_overrides(runs):
        lines += [f"Overrides common to all runs: `{' '.join(shared)}`", ""]
    lines += [
        table,
        "",
        "Final val loss is the last evaluation logged, best val loss the lowest; wall time is ended_at - "
        "started_at from run.json (it includes any time between a preemption and its resume).",
        "",
    ]
    for name, caption in zip(PLOTS, ("Loss vs step", "Loss vs tokens", "Learning rate", "Throughput"), strict=True):
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join([*lines, *study_lines])


def output_dir(dirs: Sequence[Path], out: Path | None) -> Path:
    """--out if given; else the one dir passed; else the current dir."""
    if out is not None:
        return out
    return dirs[0] if len(dirs) == 1 else Path.cwd()


def report(dirs: Sequence[Path], out: Path | None = None) -> Path:
    """Write report.md and the plots; print the table; returns report.md's path."""
    runs = collect_runs(dirs)
    target = output_dir(dirs, out)
    table = report_table(runs)
    try:
        target.mkdir(parents=True, exist_ok=True)
        write_plots(runs, target)
        study = study_of(dirs)
        study_lines = write_study_plots(study, target) if study is not None else []
        (target / REPORT).write_text(render_report(dirs, runs, table, study_lines) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write the report to {target}: {exc.strerror or exc}") from None
    print(table)
    plots = len(PLOTS) + sum(f"]({name})" in "\n".join(study_lines) for name in STUDY_PLOTS)
    print(f"\nwrote {target / REPORT} and {plots} plots")
    return target / REPORT


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("python -m gpt2exp.report", __doc__)
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run dirs, multirun dirs, or dirs under them")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write report.md and the PNGs (default: next to the runs)"
    )
    args = parser.parse_args(argv)
    try:
        report(args.dirs, args.out)
    except UserError as exc:
        fail(str(exc))


if __name__ == "__main__":
    main()
