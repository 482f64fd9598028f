"""gpt2exp's SLURM launcher (`hydra/launcher=slurm`): hydra-submitit-launcher's, waiting with gpt2exp.slurm.

Jobs are submitted as hydra-submitit-launcher submits them (one SLURM job, or one array job for a
sweep; requeued by submitit after the time-limit or preemption signal). Only the wait differs:
submitit waits for ever on a job that ended without a result when SLURM keeps no accounting
(`scancel`); `gpt2exp.slurm.wait_for_results` notices it, names it and exits 69.
Hydra instantiates launchers only from the `hydra_plugins` namespace, hence this package.
"""

import contextlib
import io
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

try:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:  # without the `sweeps` extra: no launcher here (launch.py names the package to install),
    SubmititSlurmLauncher = None  # and no import error, which Hydra's plugin scan would print at every start

log = logging.getLogger(__name__)
_LOADED_AT = time.time()  # Hydra loads its plugins before the sweep writes anything
SUBMISSION_FIX = (
    "set hydra.launcher.partition, mem_gb, gpus_per_node, cpus_per_task or timeout_min to what the cluster "
    "offers (sinfo lists its partitions)"
)


if SubmititSlurmLauncher is not None:

    class SlurmLauncher(SubmititSlurmLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            """hydra-submitit-launcher's `launch`, but for its last line, the wait."""
            import submitit

            from gpt2exp.slurm import wait_for_results

            assert self.config is not None and len(job_overrides) > 0
            init_keys = {"submitit_folder", "max_num_timeout"}
            executor = submitit.AutoExecutor(
                cluster=self._EXECUTOR,
                folder=self.params["submitit_folder"],
                slurm_max_num_timeout=self.params["max_num_timeout"],
            )
            base_params = set(OmegaConf.structured(BaseQueueConf).keys())
            params = {
                key if key in base_params else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in init_keys
            }
            executor.update_parameters(**params)

            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

            job_params: list[Any] = []
            names = []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                listed = " ".join(filter_overrides(overrides))
                log.info(f"\t#{idx} : {listed}")
                names.append(f"sweep job #{idx}")
                job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))

            try:  # submitit prints sbatch's complaint itself before it raises: held back, said in one line
                with contextlib.redirect_stderr(io.StringIO()):
                    jobs = executor.map_array(self, *zip(*job_params, strict=True))
            except submitit.core.utils.FailedJobError as exc:  # sbatch refused the request: no job was queued
                from gpt2exp.errors import fail
                from gpt2exp.slurm import refusal_reason, take_back_refused_sweep

                take_back_refused_sweep(sweep_dir, since=_LOADED_AT)
                fail(f"SLURM refused the sweep's jobs ({refusal_reason(str(exc))}); {SUBMISSION_FIX}")
            return wait_for_results(jobs, names, sweep_dir)
