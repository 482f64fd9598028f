"""The Tracker's W&B rows: each one handed over committed, as it is logged.

W&B holds a row logged with an explicit step until a later step comes (or the run finishes): a kill
right after the checkpoint of step N lost row N for good, since the resume rewinds W&B to N and goes on
from N + 1 (reproduced offline: the W&B history had steps 0-2 and 4-8 around a checkpoint at 3).
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from gpt2exp.tracking import Tracker


class RecordingRun:
    """A W&B run as the Tracker calls it: what `log` was given."""

    def __init__(self):
        self.calls = []

    def log(self, data, **kwargs):
        self.calls.append((data, kwargs))


def test_each_row_goes_to_wandb_committed_at_its_step_and_to_metrics_jsonl(tmp_path):
    tracker = Tracker(OmegaConf.create({"backend": "wandb", "mode": "offline"}), tmp_path)
    tracker._wandb_run = run = RecordingRun()
    tracker.log(3, {"train/loss": 4.5, "lr": 0.001})
    tracker.log(4, {"train/loss": 4.25})
    assert run.calls == [
        ({"train/loss": 4.5, "lr": 0.001}, {"step": 3, "commit": True}),
        ({"train/loss": 4.25}, {"step": 4, "commit": True}),
    ]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "train/loss": 4.5, "lr": 0.001}, {"step": 4, "train/loss": 4.25}]
