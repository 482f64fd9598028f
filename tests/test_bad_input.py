"""Bad input through the real command line: exit 2, exactly one `error:` line on stderr, and no new
files, whether the launcher finds it (missing data files, no GPU, a run dir in use, a swept value)
or only the job can (text too small once tokenized); and a report over dirs that are not all runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import FAST, run_cli
from tests.test_resume import snapshot

SHORT = [*FAST, "trainer.max_steps=2", "scheduler.warmup_steps=0"]
TOO_SMALL = (
    "error: the training data holds 4 tokens, too few for trainer.batch_size=4 windows of model.block_size=32; "
    "use more text or smaller settings"
)


def refused(cwd: Path, *args: str, watched: Path | None = None, unprivileged: bool = False) -> str:
    """Run the CLI expecting bad input: exit 2, one stderr line, no traceback, no ERROR log line, and
    `watched` (default: the cwd) byte-identical afterwards. Returns the line."""
    watched = watched or cwd
    before = snapshot(watched)
    result = run_cli("gpt2exp.train", *args, cwd=cwd, unprivileged=unprivileged)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ERROR" not in result.stdout, result.stdout[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert snapshot(watched) == before
    return lines[0]


@pytest.fixture
def small_text(tmp_path: Path) -> Path:
    (tmp_path / "small.txt").write_text("hello world\n")
    return tmp_path / "small.txt"


# -- found by the launcher, before Hydra writes -------------------------------------------------------


@pytest.mark.slow
def test_a_missing_data_file(tmp_path):
    error = refused(tmp_path, *SHORT, "data=text_files", "data.files=[missing.txt]")
    assert error == "error: data file not found: missing.txt; check the path in data.files=[...]"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["data.files=[my/story.txt]"],
            "error: data.files applies only to data=text_files, not to data=shakespeare; did you mean data=text_files?",
        ),
        (
            ["data.dataset=wikitext"],
            "error: data.dataset applies only to data=hf_dataset, not to data=shakespeare; "
            "did you mean data=hf_dataset?",
        ),
    ],
)
def test_a_data_key_of_another_source_is_refused_not_silently_trained_on_shakespeare(tmp_path, args, error):
    assert refused(tmp_path, *SHORT, *args) == error
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_an_interpolation_that_does_not_resolve_is_one_line_and_a_hydra_one_trains(tmp_path):
    error = refused(tmp_path, *SHORT, "optimizer.lr=${oc.env:GPT2EXP_NO_SUCH_LR}")
    assert error == (
        "error: KeyError raised while resolving interpolation: \"Environment variable 'GPT2EXP_NO_SUCH_LR' not "
        'found" (key optimizer.lr)'
    )
    named = run_cli(
        "gpt2exp.train", *SHORT, "hydra.run.dir=run", "checkpoint.dir=ckpt-${hydra:runtime.choices.model}", cwd=tmp_path
    )
    assert named.returncode == 0, named.stderr[-3000:]
    assert [p.name for p in (tmp_path / "ckpt-gpt2_tiny").glob("*/step_*")] == ["step_00000002"]  # one per run id


@pytest.mark.slow
def test_hydra_job_chdir_is_refused(tmp_path, small_text):
    """Accepted, the launcher checked data.files from here and the job read them from the run dir."""
    error = refused(tmp_path, *SHORT, "hydra.job.chdir=true", "data=text_files", f"data.files=[{small_text.name}]")
    assert error == (
        "error: hydra.job.chdir=true is not supported: gpt2exp reads relative paths from the dir it is started in "
        "and writes into the run dir by its path; drop hydra.job.chdir"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--cfg", "job", "trainer.max_step=3"], "error: Could not override 'trainer.max_step': Key 'max_step' not in "
         "'TrainerConfig' (key trainer.max_step)"),  # Hydra's own: 7 lines, exit 1
        (["--cfg", "job", "data.files=[a.txt]"], "error: data.files applies only to data=text_files, not to "
         "data=shakespeare; did you mean data=text_files?"),  # printed, though a run refuses it
        (["-m", "--cfg", "job", "seed=1,2"], "error: --cfg and --info print one composition and take no -m; drop -m "
         "(and the sweep's lists)"),  # a traceback
    ],
)  # fmt: skip
def test_printing_the_config_checks_it_as_a_run_would(tmp_path, args, error):
    assert refused(tmp_path, *args) == error
    printed = run_cli("gpt2exp.train", "--cfg", "job", "trainer.batch_size=7", cwd=tmp_path)
    assert printed.returncode == 0 and "  batch_size: 7\n" in printed.stdout


@pytest.mark.slow
def test_a_data_glob_that_matches_only_dirs(tmp_path):
    (tmp_path / "texts").mkdir()
    error = refused(tmp_path, *SHORT, "data=text_files", "data.files=[texts]")
    assert error == "error: data.files names no files; set data.files=[path/to/text.txt]"


@pytest.mark.slow
def test_a_data_cache_dir_that_is_a_file_is_refused_before_hydra_writes(tmp_path):
    (tmp_path / "cache").write_text("not a dir")
    error = refused(tmp_path, *SHORT, f"data.cache_dir={tmp_path / 'cache'}")
    assert error == (
        f"error: data.cache_dir={tmp_path / 'cache'}: {tmp_path / 'cache'} is not a directory; name a directory for "
        "the token cache"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "key", "base"), [([], "run", "outputs"), (["-m", "seed=1,2"], "sweep", "multirun")])
def test_a_run_or_sweep_dir_hydra_cannot_make_in_a_read_only_dir_is_one_line(tmp_path, args, key, base):
    """Hydra's own outputs/<date>/<time> (multirun/ for a sweep) under a dir this user cannot write in:
    Hydra would fail making it with a traceback."""
    cwd = tmp_path / "read-only"
    cwd.mkdir()
    cwd.chmod(0o555)
    line = refused(cwd, *SHORT, *args, unprivileged=True)
    assert re.fullmatch(
        rf"error: hydra\.{key}\.dir={base}/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d: {re.escape(str(cwd))} is not writable; "
        "name a directory you can write in",
        line,
    ), line


@pytest.mark.slow
def test_a_misspelled_hydra_setting_is_one_line(tmp_path):
    assert refused(tmp_path, *SHORT, "hydra.run.dirx=run") == (
        "error: Could not override 'hydra.run.dirx': Key 'dirx' not in 'RunDir' (key hydra.run.dirx)"
    )


@pytest.mark.slow
def test_device_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    error = refused(tmp_path, *SHORT, "device=cuda")
    assert error == "error: device=cuda but no CUDA GPU is available; use device=auto or device=cpu"


@pytest.mark.slow
def test_a_run_dir_in_use_by_another_process(tmp_path):
    """Another process holds the dir (still starting: no run record yet); nothing is written to it."""
    from gpt2exp.rundir import RunLock

    busy = tmp_path / "busy"
    busy.mkdir()
    with RunLock(busy):
        error = refused(tmp_path, *SHORT, f"hydra.run.dir={busy}")
    assert error.startswith(f"error: run dir {busy} is in use by another process (pid ")


@pytest.mark.slow
def test_a_swept_value_naming_a_missing_file_fails_before_any_job(tmp_path, small_text):
    (tmp_path / "a.txt").write_text(small_text.read_text() * 400)
    error = refused(tmp_path, "-m", *SHORT, "data=text_files", "data.files=[a.txt],[missing.txt]")
    assert error == "error: data file not found: missing.txt; check the path in data.files=[...]"
    assert not (tmp_path / "multirun").exists()


# -- found only in the job: what the launch added is taken back -----------------------------------------


@pytest.mark.slow
def test_a_text_too_small_once_tokenized_leaves_no_run_dir(tmp_path, small_text):
    error = refused(tmp_path, *SHORT, "data=text_files", f"data.files=[{small_text.name}]")
    assert error == TOO_SMALL
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_named_run_dir_is_taken_back_to_what_was_there(tmp_path, small_text):
    new = tmp_path / "new" / "nested" / "run"
    error = refused(tmp_path, *SHORT, "data=text_files", f"data.files=[{small_text}]", f"hydra.run.dir={new}")
    assert error == TOO_SMALL and not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    error = refused(tmp_path, *SHORT, "data=text_files", f"data.files=[{small_text}]", f"hydra.run.dir={existing}")
    assert error == TOO_SMALL and sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


# -- what a launch takes back (unit) -------------------------------------------------------------------


def test_a_footprint_takes_back_only_what_the_launch_added(tmp_path):
    from gpt2exp.rundir import Footprint

    existing = tmp_path / "existing"
    (existing / ".hydra").mkdir(parents=True)
    (existing / "notes.txt").write_text("mine")
    footprint = Footprint.before_launch(existing, (".hydra/resume-1",))
    (existing / ".hydra" / "resume-1").mkdir()
    (existing / ".lock").write_text("")
    footprint.erase()
    assert sorted(p.name for p in existing.rglob("*")) == [".hydra", "notes.txt"]

    new = tmp_path / "a" / "b" / "run"
    footprint = Footprint.before_launch(new)
    assert (footprint.before, footprint.top) == (None, tmp_path / "a")
    new.mkdir(parents=True)
    (new / "config.yaml").write_text("")
    footprint.prune()  # without the lock: empty dirs only
    assert (new / "config.yaml").exists()
    footprint.erase()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]

    hydra_made = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    (hydra_made / ".hydra").mkdir(parents=True)
    (tmp_path / "outputs" / "2026-01-01" / "09-00-00").mkdir()  # an earlier run of the day stays
    footprint = Footprint.at_job_start(hydra_made, tmp_path)
    assert (footprint.before, footprint.top) == (None, hydra_made)
    footprint.erase()
    assert [p.name for p in (tmp_path / "outputs" / "2026-01-01").iterdir()] == ["09-00-00"]


# -- the report over outputs/<date>/* -----------------------------------------------------------------


@pytest.mark.slow
def test_report_skips_a_dir_that_is_not_a_run_with_a_note(tmp_path):
    day = tmp_path / "outputs" / "2026-01-01"
    result = run_cli("gpt2exp.train", *SHORT, f"hydra.run.dir={day / '10-00-00'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    leftover = day / "09-00-00"  # what a launch of an earlier version left behind after exit 2
    (leftover / ".hydra").mkdir(parents=True)
    (leftover / "train.log").write_text("")
    (day / "notes.md").write_text("what ran today\n")  # `report outputs/<date>/*` passes files too
    report = run_cli("gpt2exp.report", *sorted(str(p) for p in day.iterdir()), "--out", "r", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert report.stderr == (
        f"note: skipping {leftover}: no gpt2exp run in it (no config.yaml and run.json)\n"
        f"note: skipping {day / 'notes.md'}: a file\n"
    )
    rows = [line for line in report.stdout.splitlines() if line.startswith("| 10-00-00")]
    assert len(rows) == 1 and "completed" in rows[0]
    assert json.loads((day / "10-00-00" / "run.json").read_text())["status"] == "completed"


def test_an_override_hydra_cannot_read_says_how_to_quote_it(tmp_path):
    from gpt2exp.errors import UserError
    from gpt2exp.overrides import parse

    with pytest.raises(UserError) as refused:
        parse(["checkpoint.dir=~/ckpts"])
    assert str(refused.value) == (
        "cannot read the override: LexerNoViableAltException: checkpoint.dir=~/ckpts; quote a value holding what "
        "Hydra reads as syntax (a leading ~, = , [ ] { } ( ) or a quote) for Hydra inside the shell's quotes: "
        "\"key='value'\""
    )
    assert parse(["checkpoint.dir='~/ckpts'"])[0].value() == "~/ckpts"


def test_a_run_dir_that_resolves_only_once_hydra_runs_is_left_to_hydra(tmp_path):
    """`${hydra:runtime.choices.model}` needs the HydraConfig a job sets: not resolvable, not checked, no error."""
    from gpt2exp.composing import compose_with_hydra
    from gpt2exp.config import CONF_DIR

    cfg, run_dir = compose_with_hydra(CONF_DIR, ["hydra.run.dir=runs/${hydra:runtime.choices.model}"], "hydra.run.dir")
    assert run_dir is None and cfg.model.n_layer == 4
    _, stamped = compose_with_hydra(CONF_DIR, [], "hydra.run.dir")
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", stamped)
