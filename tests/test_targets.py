"""`resolve_target`: what a run-dir-or-checkpoint-dir path names, and the error text for anything else.

Also holds the hand-made run and checkpoint dirs the generate and ckpt tests build on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from gpt2exp.errors import UserError
from gpt2exp.targets import Target, resolve_target

# -- hand-made dirs, as gpt2exp.train leaves them ---------------------------------------------------


def make_run_dir(path: Path) -> Path:
    """A run dir as far as the file layout goes: config.yaml, run.json and an empty checkpoints/."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.yaml").write_text("seed: 1\n")
    (path / "run.json").write_text(json.dumps({"run_id": path.name, "status": "completed"}))
    return path


def write_manifest(checkpoint: Path, step: int = 0) -> Path:
    """manifest.json (size and sha256 of every file) for the files already in `checkpoint`."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(checkpoint.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {"version": 1, "step": step, "files": files, "metrics": {}}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return checkpoint


def make_checkpoint(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """A committed checkpoint dir (named step_XXXXXXXX) holding `files` and their manifest."""
    path.mkdir(parents=True)
    for name, data in (files or {"model.safetensors": b"weights"}).items():
        (path / name).write_bytes(data)
    return write_manifest(path, int(path.name.removeprefix("step_")))


# -- what resolves -------------------------------------------------------------------------------


def test_a_run_dir(tmp_path):
    run = make_run_dir(tmp_path / "run")
    assert resolve_target(run) == Target(run_dir=run, checkpoint=None)
    assert resolve_target(str(run)) == Target(run_dir=run, checkpoint=None)


def test_a_checkpoint_inside_a_run_names_its_run(tmp_path):
    run = make_run_dir(tmp_path / "run")
    ckpt = make_checkpoint(run / "checkpoints" / "step_00000020")
    assert resolve_target(ckpt) == Target(run_dir=run, checkpoint=ckpt)


def test_a_loose_checkpoint_has_no_run(tmp_path):
    ckpt = make_checkpoint(tmp_path / "saved" / "step_00000020")
    assert resolve_target(ckpt) == Target(run_dir=None, checkpoint=ckpt)
    # moved aside after failing verification: two levels up is checkpoints/, not the run
    run = make_run_dir(tmp_path / "run")
    aside = make_checkpoint(run / "checkpoints" / "corrupt" / "step_00000010")
    assert resolve_target(aside) == Target(run_dir=None, checkpoint=aside)


def test_a_checkpoint_whose_run_json_is_damaged_is_a_loose_checkpoint(tmp_path):
    run = make_run_dir(tmp_path / "run")
    ckpt = make_checkpoint(run / "checkpoints" / "step_00000020")
    (run / "run.json").write_text("[]")  # not a run's record: it claims nothing
    assert resolve_target(ckpt) == Target(run_dir=None, checkpoint=ckpt)


def test_paths_come_back_absolute_with_home_expanded(tmp_path, monkeypatch):
    run = make_run_dir(tmp_path / "home" / "outputs" / "run")
    ckpt = make_checkpoint(run / "checkpoints" / "step_00000003")
    monkeypatch.chdir(tmp_path / "home")
    assert resolve_target("outputs/run") == Target(run_dir=run, checkpoint=None)
    assert resolve_target(Path("outputs/run/checkpoints/../checkpoints/step_00000003")) == Target(run, ckpt)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_target("~/outputs/run") == Target(run_dir=run, checkpoint=None)
    target = resolve_target("~/outputs/run/checkpoints/step_00000003")
    assert target == Target(run_dir=run, checkpoint=ckpt) and target.checkpoint.is_absolute()


def test_a_symlink_resolves_to_the_real_dir(tmp_path):
    run = make_run_dir(tmp_path / "run")
    (tmp_path / "link").symlink_to(run)
    assert resolve_target(tmp_path / "link") == Target(run_dir=run, checkpoint=None)


def test_a_target_is_frozen(tmp_path):
    target = resolve_target(make_run_dir(tmp_path / "run"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.run_dir = None  # type: ignore[misc]


# -- what does not -------------------------------------------------------------------------------


def test_a_missing_path(tmp_path):
    with pytest.raises(UserError) as caught:
        resolve_target(tmp_path / "nope")
    assert str(caught.value) == f"path does not exist: {tmp_path / 'nope'}; pass a run dir or a checkpoint dir"


def test_a_missing_path_under_home_is_named_as_given(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"^path does not exist: ~/nope; pass a run dir or a checkpoint dir$"):
        resolve_target("~/nope")


def test_a_step_dir_without_its_manifest_is_named_as_a_checkpoint_to_be_found_corrupt(tmp_path):
    """No commit leaves one (they are made under a temporary name): it lost its manifest, and verifying
    it says so, where "neither a run dir nor a checkpoint dir" misled."""
    run = make_run_dir(tmp_path / "run")
    (run / "checkpoints" / "step_00000005").mkdir()
    target = resolve_target(run / "checkpoints" / "step_00000005")
    assert (target.run_dir, target.checkpoint) == (run.resolve(), (run / "checkpoints" / "step_00000005").resolve())


@pytest.mark.parametrize(
    "name",
    [
        "plain",  # an ordinary dir
        "run/checkpoints",  # the checkpoints dir itself
        "run/checkpoints/latest",  # a file
        "half",  # config.yaml without run.json
    ],
)
def test_neither_a_run_dir_nor_a_checkpoint_dir(tmp_path, name):
    make_run_dir(tmp_path / "run")
    (tmp_path / "plain").mkdir()
    (tmp_path / "run" / "checkpoints" / "step_00000005").mkdir()
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000005\n")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("seed: 1\n")
    path = tmp_path / name
    with pytest.raises(UserError) as caught:
        resolve_target(path)
    assert str(caught.value) == (
        f"{path} is neither a gpt2exp run dir (config.yaml and run.json) nor a checkpoint dir (checkpoints/step_*)"
    )
