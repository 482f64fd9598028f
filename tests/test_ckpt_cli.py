"""`python -m gpt2exp.ckpt list|verify`: the table, a non-zero exit on corruption, and bad arguments.

The module's real run is shared and never changed: a test that changes files works on its own copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpt2exp.ckpt import main
from tests.conftest import FAST, run_cli
from tests.test_targets import make_checkpoint, make_run_dir


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def call(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of main([...]) in this process."""
    with pytest.raises(SystemExit) as caught:
        main(list(args))
    captured = capsys.readouterr()
    return caught.value.code, captured.out, captured.err


# -- a real run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 9-step run of the real CLI with checkpoints at 3, 6, 9; shared by this module's tests, read-only."""
    cwd = tmp_path_factory.mktemp("ckpt")
    result = run_cli(
        "gpt2exp.train",
        *FAST,
        f"hydra.run.dir={cwd / 'run'}",
        "trainer.max_steps=9",
        "trainer.eval_every=3",
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=1",
        "checkpoint.keep_best=1",
        "checkpoint.keep_every=6",
        "optimizer.lr=3e-3",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


@pytest.fixture
def own_run(run, tmp_path) -> Path:
    """This test's own copy of the real run, free to change."""
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.slow
def test_list_shows_each_checkpoint_and_why_it_is_kept(run):
    result = run_cli("gpt2exp.ckpt", "list", str(run), cwd=run)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "saved", "size", "val/loss", "status", "kept", "because"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(table, key=int) == ["6", "9"]  # step 3 rotated away: not last, not best, not a milestone
    assert table["9"][-1].startswith("last") and "milestone" in table["6"][-1]
    assert all("verified" in row for row in table.values())


@pytest.mark.slow
def test_list_gives_the_reasons_of_the_retention_the_last_resume_ran_with(own_run):
    """keep_last=2 on resume keeps step 9 as one of the last two: the record's keep_last=1 would show it as
    kept for no reason."""
    import json

    resumed = run_cli(
        "gpt2exp.train", f"resume={own_run}", "trainer.max_steps=12", "checkpoint.keep_last=2", cwd=own_run.parent
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [resume] = json.loads((own_run / "run.json").read_text())["resumes"]
    assert resume["retention"] == {
        "keep_last": 2, "keep_best": 1, "keep_every": 6, "best_metric": "val/loss", "best_mode": "min"
    }  # fmt: skip
    listed = run_cli("gpt2exp.ckpt", "list", str(own_run), cwd=own_run)
    assert listed.returncode == 0, listed.stderr
    table = {line.split()[0]: line.split()[-1] for line in listed.stdout.splitlines()[1:]}
    assert sorted(table, key=int) == ["6", "9", "12"]
    assert (table["6"], table["9"]) == ("milestone", "last") and table["12"].startswith("last")


@pytest.mark.slow
def test_list_of_one_checkpoint_shows_its_row_only(run):
    result = run_cli("gpt2exp.ckpt", "list", str(run / "checkpoints" / "step_00000006"), cwd=run)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[1].split()[0] == "6" and "milestone" in lines[1].split()[-1]


@pytest.mark.slow
def test_verify_passes_then_fails_on_a_flipped_byte(own_run):
    ok = run_cli("gpt2exp.ckpt", "verify", str(own_run), cwd=own_run)
    assert ok.returncode == 0 and ok.stdout.splitlines() == ["step_00000006: ok", "step_00000009: ok"]
    flip_last_byte(own_run / "checkpoints" / "step_00000009" / "model.safetensors")
    bad = run_cli("gpt2exp.ckpt", "verify", str(own_run / "checkpoints" / "step_00000009"), cwd=own_run)
    assert bad.returncode == 1
    assert bad.stdout.strip() == "step_00000009: CORRUPT: model.safetensors fails its sha256 check"
    # verification never moves or deletes anything
    assert (own_run / "checkpoints" / "step_00000009").is_dir() and not (own_run / "checkpoints" / "corrupt").exists()
    listed = run_cli("gpt2exp.ckpt", "list", str(own_run), cwd=own_run)
    assert listed.returncode == 0 and "CORRUPT: model.safetensors fails its sha256 check" in listed.stdout


@pytest.mark.slow
def test_a_step_dir_that_lost_its_manifest_is_listed_corrupt_and_a_resume_sets_it_aside(own_run):
    """Before, list and verify passed over it, and every resume failed saving that step again (exit 74):
    the commit's rename met the dir."""
    (own_run / "checkpoints" / "step_00000009" / "manifest.json").unlink()
    listed = run_cli("gpt2exp.ckpt", "list", str(own_run), cwd=own_run)
    assert listed.returncode == 0, listed.stderr
    table = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert sorted(table, key=int) == ["6", "9"] and "CORRUPT: no manifest.json" in table["9"]
    verified = run_cli("gpt2exp.ckpt", "verify", str(own_run), cwd=own_run)
    assert (verified.returncode, verified.stdout.splitlines()) == (
        1, ["step_00000006: ok", "step_00000009: CORRUPT: no manifest.json"]
    )  # fmt: skip
    resumed = run_cli("gpt2exp.train", f"resume={own_run}", "trainer.max_steps=12", cwd=own_run.parent)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000009 has no manifest.json: it is no committed checkpoint" in resumed.stdout
    assert sorted(p.name for p in (own_run / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000012"]
    assert [p.name[:13] for p in (own_run / "checkpoints" / "corrupt").iterdir()] == ["step_00000009"]


@pytest.mark.slow
def test_bad_path_is_exit_2(tmp_path):
    result = run_cli("gpt2exp.ckpt", "verify", str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: path does not exist: {tmp_path / 'nope'}; pass a run dir or a checkpoint dir\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code"), [(["--help"], 0), (["list", "--help"], 0), (["verify", ".", "--bogus"], 2), (["frob", "."], 2)]
)
def test_the_real_command_answers_help_and_bad_arguments(tmp_path, args, code):
    result = run_cli("gpt2exp.ckpt", *args, cwd=tmp_path)
    assert result.returncode == code
    if code == 0:
        assert result.stdout.startswith("usage: python -m gpt2exp.ckpt") and result.stderr == ""
    else:
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ") and result.stdout == ""


# -- hand-made checkpoints, in process -------------------------------------------------------------


@pytest.fixture
def made(tmp_path) -> Path:
    """A run dir with two committed checkpoints (file layout and manifests only)."""
    run = make_run_dir(tmp_path / "run")
    for step in (2, 4):
        make_checkpoint(run / "checkpoints" / f"step_{step:08d}", {"model.safetensors": b"w" * step, "a.json": b"{}"})
    return run


def test_verify_every_checkpoint_of_a_run_then_one(made, capsys):
    assert call(capsys, "verify", str(made)) == (0, "step_00000002: ok\nstep_00000004: ok\n", "")
    flip_last_byte(made / "checkpoints" / "step_00000002" / "model.safetensors")
    code, out, _ = call(capsys, "verify", str(made))
    assert code == 1
    assert out == "step_00000002: CORRUPT: model.safetensors fails its sha256 check\nstep_00000004: ok\n"
    assert call(capsys, "verify", str(made / "checkpoints" / "step_00000004")) == (0, "step_00000004: ok\n", "")


MISSHAPEN = "unreadable manifest (its files are not listed with a size and a sha256 each)"


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (None, "no manifest.json"),  # lost: a file deleted, a partial copy
        ('{"files": ["a.json"]}', MISSHAPEN),
        ('{"files": {"a.json": {"sha256": "00"}}}', MISSHAPEN),
        ("[1]", MISSHAPEN),
    ],
)
def test_a_step_dir_whose_manifest_is_lost_or_misshapen_is_corrupt_to_verify(made, capsys, manifest, problem):
    path = made / "checkpoints" / "step_00000004" / "manifest.json"
    path.unlink() if manifest is None else path.write_text(manifest)
    assert call(capsys, "verify", str(made)) == (1, f"step_00000002: ok\nstep_00000004: CORRUPT: {problem}\n", "")
    assert call(capsys, "verify", str(path.parent)) == (1, f"step_00000004: CORRUPT: {problem}\n", "")


def test_verify_a_loose_checkpoint_but_list_needs_its_run(tmp_path, capsys):
    loose = make_checkpoint(tmp_path / "saved" / "step_00000007")
    assert call(capsys, "verify", str(loose)) == (0, "step_00000007: ok\n", "")
    code, out, err = call(capsys, "list", str(loose))
    assert (code, out) == (2, "")
    assert err == (
        f"error: {loose} is a checkpoint dir outside a run; `list` needs the run's config.yaml "
        "(`verify` checks a loose checkpoint)\n"
    )


def test_verify_a_run_without_checkpoints(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run")
    assert call(capsys, "verify", str(run)) == (2, "", f"error: run dir {run} has no checkpoints\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: {list,verify}"),
        (["verify"], "the following arguments are required: PATH"),
        (["list", "RUN", "--bogus"], "unrecognized arguments: --bogus"),
        (["verify", "RUN", "extra"], "unrecognized arguments: extra"),
        (["frob", "RUN"], "argument {list,verify}: invalid choice: 'frob' (choose from 'list', 'verify')"),
        (["verify", "nope"], "path does not exist: nope; pass a run dir or a checkpoint dir"),
        (
            ["verify", "run/checkpoints"],
            "run/checkpoints is neither a gpt2exp run dir (config.yaml and run.json) "
            "nor a checkpoint dir (checkpoints/step_*)",
        ),
    ],
)
def test_bad_arguments_are_one_error_line_and_exit_2(made, capsys, monkeypatch, args, message):
    monkeypatch.chdir(made.parent)
    args = ["run" if arg == "RUN" else arg for arg in args]
    assert call(capsys, *args) == (2, "", f"error: {message}\n")


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["list", "--help"], ["verify", "-h"]])
def test_help_exits_0(capsys, args):
    code, out, err = call(capsys, *args)
    assert code == 0 and err == ""
    assert out.startswith("usage: python -m gpt2exp.ckpt")
    if args[0].startswith("-"):  # the top-level help carries the module's examples
        assert "python -m gpt2exp.ckpt verify outputs/<date>/<time>/checkpoints/step_00000200" in out
    else:
        assert "PATH" in out
