"""Run one method on a prepared task in the simulator: what the demo and the benchmarks do."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from flare_duallora.deploy.recipe import DualLoRARecipe
from flare_duallora.deploy.simulate import DualLoRASimEnv, SimulationResult
from flare_duallora.flare.run_files import simulator_state_root
from flare_duallora.synthetic_tasks import TaskSetup


def run_method(setup: TaskSetup, method: str, workdir: str | Path, rounds: int = 3, local_epochs: int = 1,
               seed: int = 0, settings: Optional[dict] = None, timeout: Optional[float] = 3600,
               log: Optional[Callable[[str], None]] = None, **recipe_kw) -> SimulationResult:
    """A fresh federation of ``method`` on ``setup`` in the simulator (workspace ``<workdir>/workspace``; an earlier
    run's workspace for the same job is removed first, private state included)."""
    work = Path(workdir).resolve()
    values = {**setup.adapter, **(settings or {}), "method": method, "seed": seed}
    recipe = DualLoRARecipe(
        name=f"{setup.name}_{method}", target="sim", bundle_root=str(setup.bundle), settings=values,
        clients=setup.sites, datalist_dir=str(setup.datalist_dir), num_rounds=rounds, local_epochs=local_epochs,
        bundle_overrides=setup.overrides, seed=seed, **recipe_kw)
    env = DualLoRASimEnv(clients=setup.sites, workspace_root=work / "workspace", timeout=timeout, log=log,
                         raise_on_failure=False)
    for folder in (env.workspace(recipe.name), simulator_state_root(env.workspace(recipe.name))):
        shutil.rmtree(folder, ignore_errors=True)  # a fresh federation: no earlier private state
    recipe.run(env)
    return env.result
