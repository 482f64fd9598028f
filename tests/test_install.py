"""The package works when installed, not only from the source tree: conf/ ships inside it.

A non-editable `pip install .` and a built wheel are each installed (without dependencies, which the
test environment already has) into a folder of their own; the CLI then runs from an unrelated
directory with only that folder on the path, so the source tree cannot be what answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO

pytestmark = pytest.mark.slow


def pip(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", params=["pip install .", "wheel"])
def installed(request, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("install")
    target = work / "site"
    if request.param == "wheel":
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(REPO), cwd=work)
        (wheel,) = (work / "dist").glob("gpt2exp-*.whl")
        pip("install", "--no-deps", "--target", str(target), str(wheel), cwd=work)
    else:
        pip("install", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO), cwd=work)
    return target


def test_the_installed_package_is_the_one_imported_and_holds_its_configs(installed, tmp_path):
    out = run_installed(installed, tmp_path, "-c", "import gpt2exp.config as c; print(c.__file__); print(c.CONF_DIR)")
    module, conf_dir = out.stdout.split()
    assert Path(module).is_relative_to(installed)
    assert Path(conf_dir) == installed / "gpt2exp" / "conf"
    expected = sorted(p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml"))
    assert sorted(p.relative_to(conf_dir) for p in Path(conf_dir).rglob("*.yaml")) == expected


def test_cfg_job_and_a_short_run_work_from_any_directory(installed, tmp_path):
    out = run_installed(installed, tmp_path, "-m", "gpt2exp.train", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "source: shakespeare" in out.stdout and "every_minutes: 30.0" in out.stdout
    run_dir = tmp_path / "run"
    out = run_installed(
        installed, tmp_path, "-m", "gpt2exp.train", *FAST, "trainer.max_steps=3", f"hydra.run.dir={run_dir}"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run_dir / "checkpoints" / "step_00000003" / "manifest.json").is_file()
