"""FLARE Executor: trains a site's adapted MONAI-bundle network and sends only the shared state.

Tasks: ``train`` (load received shared weights, train locally, return shared weights + metrics),
``validate`` (personalised and global-only metrics on the site's own validation data) and ``submit_model``
(the site's shared weights).  Private adapters and the optimiser state are saved in the site's workspace
after every round and restored when the site restarts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from flare_duallora.engine import AdapterSettings, StateError
from flare_duallora.flare.comm import payload_bytes
from flare_duallora.training.site import SiteTrainer, state_checksum

STATE_FILE = "site_state.pt"
RESULTS_FILE = "site_results.jsonl"


def _to_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _to_wire(state: dict) -> dict:
    """numpy arrays on the wire: FLARE's FOBS serialises them with no extra decomposer on either side."""
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


class DualLoRAExecutor(Executor):
    """Personalised LoRA training of a MONAI bundle on one FLARE site.

    Args:
        bundle_root: the MONAI bundle (``configs/train.json``, optional ``models/model.pt``); ``~``/``$VARS`` are
            expanded and ``pkg://flare_duallora/bundles/<name>`` names a bundle shipped in the installed package.
        datalist_dir: folder holding one datalist per site, ``<datalist_dir>/<site name>.json``; its path is
            given to the bundle as the ``datalist`` config id.
        adapter: :class:`AdapterSettings` fields (method, target_modules, blocks, rank, head, ...).
        bundle_overrides: extra bundle config overrides (e.g. ``{"image_size": [32, 32, 8]}``).
        local_epochs / local_steps: local work per round (steps wins when set).
        state_dir: where the site keeps private state; ``{site}`` and ``{job}`` are substituted.  Default:
            ``<site workspace>/flare_duallora_state/{job}``.
        device: ``auto`` (GPU when present), ``cpu`` or ``cuda:N``; ``amp``: bf16 autocast on GPU.
        seed: data-order seed (adapter init seeds are in ``adapter``).
        export_bundles: on each ``validate`` task and at the end of the run, write the personalised and the global-only model as plain MONAI
            bundles under ``<state_dir>/bundles/{personalised,global}``.
    """

    def __init__(
        self,
        bundle_root: str,
        datalist_dir: Optional[str] = None,
        adapter: Optional[dict] = None,
        bundle_overrides: Optional[dict] = None,
        local_epochs: int = 1,
        local_steps: Optional[int] = None,
        state_dir: Optional[str] = None,
        device: str = "auto",
        amp: bool = True,
        seed: int = 0,
        export_bundles: bool = True,
        train_task: str = AppConstants.TASK_TRAIN,
        validate_task: str = AppConstants.TASK_VALIDATION,
        submit_model_task: str = AppConstants.TASK_SUBMIT_MODEL,
    ):
        super().__init__()
        self.bundle_root = bundle_root
        self.datalist_dir = datalist_dir
        self.adapter = dict(adapter or {})
        self.bundle_overrides = dict(bundle_overrides or {})
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.state_dir = state_dir
        self.device = device
        self.amp = amp
        self.seed = seed
        self.export_bundles = export_bundles
        self.train_task = train_task
        self.validate_task = validate_task
        self.submit_model_task = submit_model_task
        AdapterSettings.from_dict(self.adapter)  # fail at configuration time on a bad setting
        self.trainer: Optional[SiteTrainer] = None
        self._site = ""
        self._job = ""
        self._state_path: Optional[Path] = None
        self._results_path: Optional[Path] = None

    # ------------------------------------------------------------------ lifecycle
    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._start(fl_ctx)
        elif event_type == EventType.END_RUN and self.trainer is not None:
            self._save_state(fl_ctx)
            if self.export_bundles:
                self._export(fl_ctx)

    def _start(self, fl_ctx: FLContext) -> None:
        from flare_duallora.flare.templates import resolve_bundle_path
        from flare_duallora.training.from_bundle import build_site  # heavy imports only on the site

        self._site = fl_ctx.get_identity_name()
        self._job = fl_ctx.get_job_id()
        workspace = fl_ctx.get_engine().get_workspace()
        state_dir = self.state_dir or os.path.join(workspace.get_root_dir(), "flare_duallora_state", "{job}")
        state_dir = Path(state_dir.format(site=self._site, job=self._job))
        state_dir.mkdir(parents=True, exist_ok=True)
        self._state_path = state_dir / STATE_FILE
        self._results_path = Path(workspace.get_run_dir(self._job)) / RESULTS_FILE
        datalist = None
        if self.datalist_dir:
            datalist = Path(self.datalist_dir) / f"{self._site}.json"
            if not datalist.is_file():
                raise FileNotFoundError(
                    f"site {self._site}: datalist {datalist} does not exist (setting 'datalist_dir' = {self.datalist_dir})"
                )
        self.trainer = build_site(
            resolve_bundle_path(self.bundle_root), self.adapter, datalist, self.bundle_overrides, self.device, self.amp, self.seed
        )
        adapted = self.trainer.adapted
        self.log_info(
            fl_ctx,
            f"{self._site}: method={adapted.settings.method} adapted {len(adapted.targets)} modules, "
            f"{len(adapted.shared_keys)} shared / {len(adapted.private_keys)} private keys on {self.trainer.device}",
        )
        if self._state_path.is_file():
            state = torch.load(self._state_path, map_location="cpu", weights_only=False)
            self.trainer.load_site_state(state, source=str(self._state_path))
            self._record({"event": "restored", "file": str(self._state_path), "rounds_done": self.trainer.rounds_done,
                          "private_checksum": state_checksum(self.trainer.adapted.private_state())})
            self.log_info(fl_ctx, f"{self._site}: restored private state from {self._state_path}")

    def _export(self, fl_ctx: FLContext) -> None:
        from flare_duallora.training.from_bundle import export_site_bundles

        try:
            paths = export_site_bundles(self.trainer, self._state_path.parent / "bundles", self._site)
        except Exception as e:  # an export failure must not lose the training state saved above
            self.log_exception(fl_ctx, f"{self._site}: bundle export failed: {e}")
            return
        self._record({"event": "exported", **{k: str(v) for k, v in paths.items()}})
        self.log_info(fl_ctx, f"{self._site}: exported personalised and global-only bundles to {paths}")

    def _save_state(self, fl_ctx: FLContext) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        torch.save(self.trainer.site_state(), tmp)
        os.replace(tmp, self._state_path)  # atomic: a crash never leaves a half-written state

    def _record(self, entry: dict) -> None:
        entry = {"site": self._site, "time": time.time(), **entry}
        with open(self._results_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    # ------------------------------------------------------------------ tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.trainer is None:
            self.log_error(fl_ctx, "executor was not initialised (START_RUN failed)")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        try:
            if task_name == self.train_task:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task:
                return self._validate(shareable, fl_ctx)
            if task_name == self.submit_model_task:
                return DXO(DataKind.WEIGHTS, data=_to_wire(self.trainer.adapted.shared_state())).to_shareable()
            self.log_error(fl_ctx, f"unknown task {task_name!r}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except StateError as e:
            self.log_error(fl_ctx, f"{self._site}: bad task data for {task_name!r}: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)

    def _load_global(self, shareable: Shareable, fl_ctx: FLContext) -> dict:
        dxo = from_shareable(shareable)
        if dxo.data_kind not in (DataKind.WEIGHTS,):
            raise StateError(f"expected WEIGHTS from the server, got {dxo.data_kind}")
        weights = {k: _to_tensor(v) for k, v in (dxo.data or {}).items()}
        if weights:
            self.trainer.adapted.load_shared(weights, source=f"global model received by {self._site}")
        return {"received_keys": len(weights), "received_checksum": state_checksum(weights) if weights else None}

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        received = self._load_global(shareable, fl_ctx)
        before = state_checksum(self.trainer.adapted.private_state())
        stats = self.trainer.train_round(self.local_epochs, self.local_steps, lambda: abort_signal.triggered)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        metrics = self.trainer.evaluate()
        shared = self.trainer.adapted.shared_state()
        sent = payload_bytes(shared)
        self._save_state(fl_ctx)
        self._record({
            "event": "train", "round": current_round, **received, "sent_keys": len(shared),
            "bytes_sent": sent, "private_checksum_before": before,
            "private_checksum_after": state_checksum(self.trainer.adapted.private_state()),
            **stats.as_dict(), "metrics": metrics,
        })
        self.log_info(
            fl_ctx,
            f"{self._site} round {current_round}: {stats.steps} steps, loss {stats.loss:.4f}, sent {sent} bytes, "
            f"BA personalised {metrics['personalised']['balanced_accuracy']:.3f} "
            f"global-only {metrics['global_only']['balanced_accuracy']:.3f}",
        )
        meta = {
            MetaKey.NUM_STEPS_CURRENT_ROUND: stats.steps,
            "num_examples": stats.examples,
            "bytes_sent": sent,
            "site_metrics": metrics,
        }
        return DXO(DataKind.WEIGHTS, data=_to_wire(shared), meta=meta).to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        received = self._load_global(shareable, fl_ctx)
        metrics = self.trainer.evaluate()
        self._record({"event": "validate", **received, "metrics": metrics})
        if self.export_bundles:  # the workflow validates after the last round; END_RUN may not reach every site
            self._export(fl_ctx)
        flat = {f"{kind}/{name}": value for kind, m in metrics.items() for name, value in m.items()}
        return DXO(DataKind.METRICS, data=flat).to_shareable()
