"""Assemble a FLARE job for any method with one call, and export it for ``nvflare simulator`` / submission."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType

from flare_duallora.engine import AdapterSettings
from flare_duallora.flare.audit import ReceivedKeysAudit
from flare_duallora.flare.controller import PersonalisedFedAvg
from flare_duallora.flare.executor import DualLoRAExecutor
from flare_duallora.flare.filters import PrivateKeyFilter

TASKS = ("train", "validate", "submit_model")


def build_job(
    name: str,
    bundle_root: str,
    datalist_dir: Optional[str],
    adapter: dict,
    num_clients: int = 2,
    num_rounds: int = 2,
    local_epochs: int = 1,
    local_steps: Optional[int] = None,
    bundle_overrides: Optional[dict] = None,
    weigh_by: str = "examples",
    state_dir: Optional[str] = None,
    device: str = "auto",
    seed: int = 0,
    filter_tasks: Sequence[str] = TASKS,
    on_private: str = "strip",
    scope: Optional[str] = None,
    audit: bool = True,
) -> FedJob:
    """A job with the personalised FedAvg workflow on the server and the executor + private-key filter on every site.

    The filter is registered for explicit task names (``filter_tasks``): nvflare 2.9.0 never applies ``"*"``.
    ``scope`` names a site privacy scope the job asks for (meta ``scope``).  ``audit`` records on the server the
    keys of every result as received (``received_keys.jsonl``).
    """
    settings = AdapterSettings.from_dict(adapter)  # validates before anything is written
    sharing = dict(method=settings.method, head=list(settings.heads) or None, head_shared=settings.head_shared)
    job = FedJob(name=name, min_clients=num_clients, meta_props={"scope": scope} if scope else None)
    job.set_app_packages(["flare_duallora"])  # sites import the installed package: no BYOC custom code
    job.to_server(
        PersonalisedFedAvg(weigh_by=weigh_by, num_clients=num_clients, num_rounds=num_rounds, **sharing)
    )
    job.to_clients(
        DualLoRAExecutor(
            bundle_root=str(bundle_root),
            datalist_dir=str(datalist_dir) if datalist_dir else None,
            adapter=settings.to_dict(),
            bundle_overrides=dict(bundle_overrides or {}),
            local_epochs=local_epochs,
            local_steps=local_steps,
            state_dir=state_dir,
            device=device,
            seed=seed,
        ),
        tasks=list(TASKS),
    )
    job.to_clients(
        PrivateKeyFilter(on_private=on_private, **sharing), tasks=list(filter_tasks), filter_type=FilterType.TASK_RESULT
    )
    if audit:
        job.to_server(ReceivedKeysAudit(), tasks=list(TASKS), filter_type=FilterType.TASK_RESULT)
    return job


def export_job(job: FedJob, job_root: str | Path) -> Path:
    """Write the job folder (``<job_root>/<name>``) that ``nvflare simulator`` and ``nvflare job submit`` take."""
    job_root = Path(job_root)
    job.export_job(str(job_root))
    return job_root / job.name
