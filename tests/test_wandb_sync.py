"""The README's command for uploading a sweep's offline W&B runs names every job's dirs, per W&B id, in start order.

The loop is taken from the README as written and run in bash with `wandb` replaced by an echo.
"""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO


def readme_sweep_upload() -> str:
    readme = (REPO / "README.md").read_text()
    (block,) = re.findall(r"```bash\n(for dir in multirun/.*?)```", readme, re.DOTALL)
    return block


def test_the_readme_uploads_each_jobs_offline_runs_per_id_in_start_order(tmp_path):
    runs = {
        "0": ["offline-run-20261127_090000-aaa", "offline-run-20261127_100000-aaa"],  # started, resumed
        "1": ["offline-run-20261127_090500-ccc", "offline-run-20261127_091000-bbb"],  # restarted: a second id
        "2": [],  # never reached W&B
    }
    sweep = tmp_path / "multirun" / "2026-11-27" / "09-00-00"
    for job, names in runs.items():
        for name in names:
            (sweep / job / "wandb" / name).mkdir(parents=True)
        (sweep / job / "wandb").mkdir(parents=True, exist_ok=True)
        (sweep / job / "wandb" / "debug.log").write_text("")
    (sweep / "0" / "wandb" / "latest-run").symlink_to("offline-run-20261127_100000-aaa")
    (sweep / ".submitit").mkdir()
    script = readme_sweep_upload().replace("multirun/<date>/<time>", str(sweep)).replace("<project>", "proj")
    done = subprocess.run(
        ["bash", "-c", 'wandb() { echo "wandb $*"; }\n' + script], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    first, second = (f"{sweep / name / 'wandb'}/offline-run-20261127_" for name in ("0", "1"))
    assert done.stdout.splitlines() == [
        f"wandb sync --id aaa -p proj {first}090000-aaa {first}100000-aaa",
        f"wandb sync --id bbb -p proj {second}091000-bbb",
        f"wandb sync --id ccc -p proj {second}090500-ccc",
    ]
