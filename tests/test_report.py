"""`python -m gpt2exp.report`: the table, the plots and bad input, on hand-written run dirs and one real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from gpt2exp.report import PLOTS, Run, best_run, format_duration, main, use_log_scale, wall_seconds
from gpt2exp.rundir import RunLock
from tests.conftest import FAST, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMON = ["trainer.max_steps=30", "logger=none"]


def write_run(
    run_dir: Path,
    rows: list[dict],
    *,
    status: str = "completed",
    started: str = "2026-01-01T00:00:00+0000",
    ended: str | None = "2026-01-01T00:01:46",
    resumes: tuple[int, ...] = (),
    overrides: tuple[str, ...] = (),
) -> Path:
    """A run dir as gpt2exp.train leaves it (config.yaml, run.json, metrics.jsonl, .hydra/overrides.yaml)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "logger": {"backend": "none", "name": None}}))
    info = {"run_id": run_dir.name, "wandb_id": run_dir.name, "status": status, "started_at": started}
    info["resumes"] = [{"step": step, "at": "2026-01-01T00:01:00"} for step in resumes]
    if ended is not None:
        info["ended_at"] = ended
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    return run_dir


def curve(val: list[float], train: list[float] | None = None, every: int = 10) -> list[dict]:
    """metrics.jsonl rows: val/loss at step 0, then train and val every `every` steps (128 tokens a step)."""
    rows: list[dict] = [{"step": 0, "val/loss": val[0]}]
    for i, loss in enumerate(val[1:], start=1):
        step = i * every
        train_loss = train[i - 1] if train else loss + 0.1
        rows.append(
            {
                "step": step,
                "train/loss": train_loss,
                "lr": 1e-3,
                "tokens_per_s": 1e4,
                "tokens": 128 * step,
                "val/loss": loss,
            }
        )
    return rows


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three jobs: job 1 has the lowest best val loss, job 2 the lowest final one; job 0 was resumed at step 20."""
    root = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    write_run(
        root / "0",
        curve([8.3, 4.0, 2.5, 2.2]),
        resumes=(20,),
        overrides=(*COMMON, "optimizer.lr=0.001", "hydra.verbose=true"),
    )
    write_run(
        root / "1",
        curve([8.3, 3.0, 1.5, 1.8]),
        status="failed",
        ended="2026-01-01T01:02:05",
        overrides=(*COMMON, "optimizer.lr=0.003"),
    )
    write_run(root / "2", curve([8.3, 3.5, 1.7, 1.6]), ended=None, overrides=(*COMMON, "optimizer.lr=0.01"))
    (root / "multirun.yaml").write_text(
        yaml.safe_dump({"hydra": {"overrides": {"task": ["optimizer.lr=0.001,0.003,0.01"]}}})
    )
    return root


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """{run: {column: cell}} from the first markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))


# -- a sweep -------------------------------------------------------------------------------------


def test_a_sweep_report_has_one_row_per_job_and_marks_the_best(sweep, capsys):
    main([str(sweep)])
    printed = capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    table = parse_table(report)
    assert table == parse_table(printed)  # the same table on stdout
    assert list(table) == ["0", "1", "2"]
    assert list(table["0"]) == [
        "run",
        "overrides",
        "final val loss",
        "best val loss",
        "steps",
        "tokens",
        "wall time",
        "status",
        "resumes",
        "best",
    ]
    assert [table[job]["final val loss"] for job in table] == ["2.2000", "1.8000", "1.6000"]
    assert [table[job]["best val loss"] for job in table] == ["2.2000", "1.5000", "1.6000"]
    assert [table[job]["steps"] for job in table] == ["30", "30", "30"]
    assert [table[job]["tokens"] for job in table] == ["3,840"] * 3
    assert [table[job]["status"] for job in table] == ["completed", "failed", "completed"]
    assert [table[job]["wall time"] for job in table] == ["1m 46s", "1h 2m 5s", "-"]
    assert [table[job]["best"] for job in table] == ["", "", "**best**"]  # lowest final, not lowest best
    # only what differs between jobs, without hydra.* overrides; the shared ones once, above the table
    assert [table[job]["overrides"] for job in table] == [
        "optimizer.lr=0.001",
        "optimizer.lr=0.003",
        "optimizer.lr=0.01",
    ]
    assert "Overrides common to all runs: `trainer.max_steps=30 logger=none`" in report
    assert "Sweep: `optimizer.lr=0.001,0.003,0.01`" in report


def test_a_sweep_report_writes_the_plots_next_to_the_jobs(sweep, capsys):
    main([str(sweep)])
    report = (sweep / "report.md").read_text()
    assert report.startswith(f"# gpt2exp report: {sweep}\n\nGenerated 20")
    for name in PLOTS:
        assert_png(sweep / name)
        assert f"]({name})" in report
    assert not (sweep / "0" / "report.md").exists()


def test_a_resumed_run_shows_its_resume_step(sweep, capsys):
    main([str(sweep)])
    table = parse_table((sweep / "report.md").read_text())
    assert [table[job]["resumes"] for job in table] == ["1 (step 20)", "0", "0"]


def test_a_run_dir_gets_its_own_report_with_all_its_overrides(sweep, capsys):
    main([str(sweep / "0")])
    table = parse_table((sweep / "0" / "report.md").read_text())
    assert list(table) == ["0"] and "best" not in table["0"]
    assert table["0"]["overrides"] == "trainer.max_steps=30, logger=none, optimizer.lr=0.001"
    assert table["0"]["final val loss"] == "2.2000"
    for name in PLOTS:
        assert_png(sweep / "0" / name)


def test_several_dirs_go_to_out_or_the_current_dir(tmp_path, capsys, monkeypatch):
    a = write_run(tmp_path / "outputs" / "2026-01-01" / "10-00-00", curve([6.0, 5.0, 4.0]))
    b = write_run(tmp_path / "outputs" / "2026-01-02" / "10-00-00", curve([6.0, 4.5, 4.2]))
    main([str(a), str(b), "--out", str(tmp_path / "cmp")])
    table = parse_table((tmp_path / "cmp" / "report.md").read_text())
    assert list(table) == ["2026-01-01/10-00-00", "2026-01-02/10-00-00"]  # named below their common parent
    assert table["2026-01-01/10-00-00"]["best"] == "**best**" and table["2026-01-02/10-00-00"]["best"] == ""
    assert table["2026-01-01/10-00-00"]["wall time"] == "1m 46s"
    monkeypatch.chdir(tmp_path)
    main([str(a), str(b)])
    assert (tmp_path / "report.md").is_file() and all((tmp_path / name).is_file() for name in PLOTS)


def test_a_parent_dir_is_searched_but_not_checkpoints(tmp_path, capsys):
    write_run(tmp_path / "outputs" / "2026-01-01" / "10-00-00", curve([6.0, 5.0]))
    write_run(tmp_path / "outputs" / "checkpoints" / "x", curve([6.0, 5.0]))
    write_run(tmp_path / "outputs" / "wandb" / "x", curve([6.0, 5.0]))
    write_run(tmp_path / "outputs" / "a" / "b" / "c" / "too-deep", curve([6.0, 5.0]))
    main([str(tmp_path / "outputs"), "--out", str(tmp_path / "r")])
    assert list(parse_table(capsys.readouterr().out)) == ["2026-01-01/10-00-00"]


def test_a_run_with_no_metrics_yet_gets_dashes(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "0", curve([6.0, 5.0, 4.0]))
    write_run(tmp_path / "sweep" / "1", [], status="running", ended=None)
    with RunLock(tmp_path / "sweep" / "1"):  # a process is training there right now
        main([str(tmp_path / "sweep")])
    table = parse_table((tmp_path / "sweep" / "report.md").read_text())
    row = table["1"]
    assert [row[c] for c in ("final val loss", "best val loss", "steps", "tokens", "wall time")] == ["-"] * 5
    assert row["status"] == "running" and row["best"] == "" and table["0"]["best"] == "**best**"
    for name in PLOTS:
        assert_png(tmp_path / "sweep" / name)


def test_a_run_marked_running_that_nobody_trains_reads_interrupted(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "0", curve([6.0, 5.0, 4.0]))
    write_run(tmp_path / "sweep" / "1", curve([6.0, 5.5]), status="running", ended=None)  # killed by SIGKILL
    main([str(tmp_path / "sweep")])
    table = parse_table((tmp_path / "sweep" / "report.md").read_text())
    assert [table[j]["status"] for j in "01"] == ["completed", "interrupted"]


def test_a_run_with_a_damaged_run_json_is_listed_without_its_record(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "0", curve([6.0, 5.0, 4.0]))
    write_run(tmp_path / "sweep" / "1", curve([6.0, 4.5, 3.0]))
    (tmp_path / "sweep" / "1" / "run.json").write_text('{"run_id": "1", "sta')  # cut off mid-write
    main([str(tmp_path / "sweep")])
    table = parse_table((tmp_path / "sweep" / "report.md").read_text())
    assert table["0"]["status"] == "completed" and table["1"]["final val loss"] == "3.0000"
    assert table["1"]["status"] == "-"


def test_a_diverged_run_is_never_best(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "0", curve([6.0, 2.0, float("nan")]))
    write_run(tmp_path / "sweep" / "1", curve([6.0, 5.0, 4.0]))
    main([str(tmp_path / "sweep")])
    table = parse_table(capsys.readouterr().out)
    assert table["0"]["final val loss"] == "nan" and table["0"]["best val loss"] == "2.0000"
    assert table["0"]["best"] == "" and table["1"]["best"] == "**best**"


# -- the pieces ----------------------------------------------------------------------------------


def test_log_scale_only_when_the_losses_span_more_than_a_decade():
    assert use_log_scale([8.3, 4.0, 1.2, 0.5])
    assert not use_log_scale([6.0, 5.1, 4.0])
    assert not use_log_scale([10.0, 1.0])  # exactly a decade
    assert use_log_scale([10.0, 0.99, float("nan")])
    assert not use_log_scale([])
    assert not use_log_scale([5.0, 0.0])  # log of zero


def test_wall_time_format():
    assert format_duration(106) == "1m 46s"
    assert format_duration(42.4) == "42s"
    assert format_duration(3725) == "1h 2m 5s"
    assert format_duration(None) == "-"
    # started_at carries a UTC offset, ended_at does not (both are local time)
    assert wall_seconds({"started_at": "2026-01-01T00:00:00+0000", "ended_at": "2026-01-01T00:01:46"}) == 106
    assert wall_seconds({"started_at": "2026-01-01T00:00:00+0000"}) is None


def test_best_run_ignores_nan_and_missing():
    nan = Run(Path("a"), rows=[{"step": 10, "val/loss": math.nan}])
    empty = Run(Path("b"))
    good = Run(Path("c"), rows=[{"step": 10, "val/loss": 3.0}])
    assert best_run([nan, empty, good]) is good
    assert best_run([nan, empty]) is None


# -- bad input, through the real command line ------------------------------------------------------


@pytest.mark.slow
def test_a_missing_path_is_one_error_line(tmp_path):
    result = run_cli("gpt2exp.report", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"error: path does not exist: {tmp_path / 'nope'}; pass a run dir or a multirun dir\n"


@pytest.mark.slow
def test_a_dir_without_runs_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("gpt2exp.report", str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        f"error: no gpt2exp runs under {tmp_path / 'empty'}; "
        "pass a run dir (with config.yaml and run.json) or a multirun dir\n"
    )
    assert not (tmp_path / "empty" / "report.md").exists()


def test_an_unknown_flag_is_one_error_line(sweep, capsys):
    with pytest.raises(SystemExit) as caught:
        main([str(sweep), "--bogus"])
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: unrecognized arguments: --bogus\n" and captured.out == ""
    assert not (sweep / "report.md").exists()


def test_no_dir_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert capsys.readouterr().err == "error: the following arguments are required: DIR\n"


def test_help_shows_the_examples_and_exits_0(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m gpt2exp.report [-h] [--out OUT] DIR [DIR ...]")
    assert "python -m gpt2exp.report multirun/<date>/<time>           # a sweep" in out


# -- a real run ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_report_of_a_real_run_matches_its_metrics(tmp_path):
    trained = run_cli(
        "gpt2exp.train", *FAST, "trainer.max_steps=10", "trainer.log_every=5", "trainer.eval_every=5", cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    result = run_cli("gpt2exp.report", str(run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_val = [row["val/loss"] for row in rows if "val/loss" in row][-1]
    row = parse_table(result.stdout)[run_dir.name]
    assert row["final val loss"] == f"{last_val:.4f}"
    assert row["steps"] == "10" and row["status"] == "completed" and row["resumes"] == "0"
    assert row["tokens"] == f"{rows[-1]['tokens']:,}"
    for name in PLOTS:
        assert_png(run_dir / name)
