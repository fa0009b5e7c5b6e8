"""Server workflow: FedAvg over shared keys, then a final per-site validation, with results written to disk.

The server never needs the network or the bundle: the global model is the dict of shared keys, empty before
round 0 (every site starts from the same seeded adapters).  Files in the server's run directory:

``FL_global_model.pt``   the shared keys only (checked against the sharing rule before saving)
``site_results.json``    per site: personalised and global-only metrics of the final validation
``communication.json``   per round and site: bytes received, accepted / rejected contributions
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.fedavg import FedAvg

from flare_duallora.engine import SHARED, SharingPolicy
from flare_duallora.flare.aggregator import SharedKeyAggregator

GLOBAL_MODEL_FILE = "FL_global_model.pt"
SITE_RESULTS_FILE = "site_results.json"
COMM_FILE = "communication.json"


def _unflatten(metrics: dict) -> dict:
    out: dict = {}
    for key, value in metrics.items():
        kind, _, name = key.partition("/")
        out.setdefault(kind, {})[name] = value
    return out


class PersonalisedFedAvg(FedAvg):
    """``FedAvg`` with the shared-key aggregator, shared-only persistence and a final validation round.

    Args:
        method, head, head_shared, weigh_by: the sharing rule and weighting (see :class:`SharedKeyAggregator`).
        num_clients, num_rounds: as ``FedAvg``.
        validate_task: task sent to every site after the last round (``""`` to skip).
        ignore_result_error: keep going when a site fails a round (``True``) or stop the job (``False``).
    """

    def __init__(
        self,
        method: str,
        head: Union[None, str, Sequence[str]] = None,
        head_shared: Optional[bool] = None,
        weigh_by: str = "examples",
        num_clients: int = 2,
        num_rounds: int = 2,
        validate_task: str = "validate",
        ignore_result_error: bool = True,
    ):
        super().__init__(
            num_clients=num_clients,
            num_rounds=num_rounds,
            model={},
            persistor_id="",
            aggregator=SharedKeyAggregator(method, head, head_shared, weigh_by),
            ignore_result_error=ignore_result_error,
        )
        self.method = method
        self.head = head
        self.head_shared = head_shared
        self.weigh_by = weigh_by
        self.validate_task = validate_task
        self.policy = SharingPolicy(method, head or (), head_shared)
        self.site_results: dict = {}

    def _path(self, name: str) -> str:
        return os.path.join(self.get_run_dir(), name)

    def save_model(self, model: FLModel) -> None:
        params = model.params or {}
        bad = [k for k, r in self.policy.roles(params).items() if r != SHARED]
        if bad:  # the aggregator refuses these; this guards the file itself
            self.panic(f"refusing to persist a global model with non-shared keys: {sorted(bad)[:5]}")
            return
        torch.save({k: torch.as_tensor(v) for k, v in params.items()}, self._path(GLOBAL_MODEL_FILE))
        with open(self._path(COMM_FILE), "w") as f:
            json.dump(self.aggregator.history, f, indent=1)

    def run(self) -> None:
        self.aggregator.fl_ctx = self.fl_ctx  # not a registered component: it gets no START_RUN event
        super().run()
        if not self.validate_task or self.abort_signal.triggered:
            return
        params = {}
        if os.path.exists(self._path(GLOBAL_MODEL_FILE)):
            params = {k: v.numpy() for k, v in torch.load(self._path(GLOBAL_MODEL_FILE)).items()}
        self.info("final validation of personalised and global-only models on every site")
        results = self.send_model_and_wait(task_name=self.validate_task, data=FLModel(ParamsType.FULL, params))
        for result in results:
            site = (result.meta or {}).get("client_name", "unknown")
            self.site_results[site] = _unflatten(result.metrics or {})
        with open(self._path(SITE_RESULTS_FILE), "w") as f:
            json.dump(self.site_results, f, indent=1, sort_keys=True)
        self.info(f"per-site results written to {self._path(SITE_RESULTS_FILE)}")
