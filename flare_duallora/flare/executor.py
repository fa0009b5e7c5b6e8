"""FLARE Executor: trains a site's adapted MONAI-bundle network and sends only the shared state.

Tasks: ``train`` (check and load the received shared weights, train locally, return shared weights + metrics),
``validate`` (personalised and global-only metrics on the site's own validation data, bundles exported) and
``submit_model`` (the site's shared weights).

Failures fail, and say why: FLARE swallows exceptions raised while a site starts, so a site that cannot start
keeps the cause and answers every task with an error reply carrying it (header ``flare_duallora_cause``); the
server counts the site as failed and names the cause.  Private state is never lost: a malformed or non-finite
global model is refused before anything changes, a round that diverges is rolled back and not saved, and the
state file is written atomically from finite tensors only (the previous one kept).
"""

from __future__ import annotations

import math
import os
import re
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

from flare_duallora.bundle.paths import code_in_overrides, resolve_site_path
from flare_duallora.engine import AdapterSettings, StateError
from flare_duallora.engine.settings import int_setting_problem
from flare_duallora.engine.state import payload_bytes
from flare_duallora.flare.run_files import (
    CAUSE_HEADER, FEDEX_META, FINGERPRINT_META, PRIVACY_META, SITE_RECORDS_FILE, SITE_STATE_FILE, SITE_STATE_PREV_FILE, append_jsonl,
)
from flare_duallora.flare.filters import OUTBOUND_PROP, describe_outbound
from flare_duallora.flare.site_policy import SitePolicy, SitePolicyError, check_simple_name
from flare_duallora.training.site import state_checksum

MISMATCH_MODES = ("refuse", "reset")
CACHE_MODES = ("auto", "on", "off")
# per-round metrics, named for what they measure
GLOBAL_RECEIVED = "global_only_received"  # the received global model (private adapters off), before local training
PERSONALISED_TRAINED = "personalised_after_training"  # the site's own model after this round's local training
MAX_CAUSE = 1500
STATE_OWNER_FILE = "state_owner.json"  # which job (name, submitter) created a state folder


class GlobalModelError(ValueError):
    """The server's task data cannot be used (wrong kind, keys, shapes or non-finite values)."""


def _to_wire(state: dict) -> dict:
    """numpy arrays on the wire: FLARE's FOBS serialises them with no extra decomposer on either side."""
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _fill(template: str, values: dict) -> str:
    """``{site}``, ``{job}``, ``{key}`` in a job's ``state_dir`` replaced; nothing else is interpreted (``str.format``
    on a job string would reach into attributes of its arguments)."""
    return re.sub(r"\{(site|job|key)\}", lambda m: values[m.group(1)], template)


def _cause(site: str, err: BaseException) -> str:
    text = f"{site}: {type(err).__name__}: {err}"
    return text if len(text) <= MAX_CAUSE else text[:MAX_CAUSE] + " ..."


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


class DualLoRAExecutor(Executor):
    """Personalised LoRA training of a MONAI bundle on one FLARE site.

    Args:
        bundle_root: the MONAI bundle (``configs/train.json``, ``models/model.pt``); ``pkg://<package>/<folder>``
            names a folder of an installed package, a simple name a bundle of the site's catalogue.  The site's
            ``local/flare_duallora.json`` decides which bundles and data folders a job may use.
        settings: :class:`~flare_duallora.engine.AdapterSettings` fields (method, target_modules, blocks, rank,
            head, seed, ...), validated here once.
        datalist_dir / datalist: the folder holding ``<site name>.json``, or this site's datalist file.
        bundle_overrides: plain bundle config overrides (``{"image_size": [32, 32, 8]}``); expressions are refused
            unless the site's ``local/flare_duallora.json`` says ``allow_job_code``.
        local_epochs / local_steps: local work per round (steps wins when set).
        state_name: the stable name private state is kept under (default: the job's name; a simple name, no folder
            separators); ``resume``: continue from the state saved under that key (the server resumes its rounds
            likewise).  Without ``resume`` an existing state file is moved aside, never overwritten.  A job only
            ever touches state its own job name (and submitter) created.
        state_dir: where to keep private state instead of ``<workspace>/local/flare_duallora_state/<key>``; must lie
            inside the site workspace or a folder the site allows.
        on_state_mismatch: ``refuse`` (default) stops the site when the saved state does not fit the job (changed
            settings, other base, damaged file) and leaves the file as it is; ``reset`` moves it aside and starts
            fresh.
        allow_random_base: accept a bundle without ``models/model.pt`` (every site builds the network under the
            same seed; the base fingerprint proves it).
        prefix_cache: ``auto`` (on when nothing in the frozen prefix trains and the training transforms are
            deterministic), ``on`` (fail when it cannot be used) or ``off``.
        device: ``auto`` (GPU when present), ``cpu`` or ``cuda:N``; ``amp``: bf16 autocast on GPU.
        seed: data-order seed (adapter init seeds are in ``settings``).
        export_bundles: at the final validation, write the personalised and the global-only model as plain MONAI
            bundles under ``<state folder>/bundles/{personalised,global}``.
        lora_aggregation: the job's LoRA aggregation mode; fedex residuals are accepted only in a ``fedex`` job.
        task: ``auto`` (read from the bundle), ``classification`` or ``segmentation``.
        bundle_ids: the bundle's own names of the standard config ids (``{"train#dataset": "train_dataset",
            "validate#dataset": "val_dataset", "loss": "lossfn"}``).
        differential_privacy: ``{"epsilon", "delta", "max_grad_norm", "rounds", ...}`` trains every step with DP-SGD
            under a whole-job budget (:mod:`flare_duallora.training.privacy`); ``None``: no DP.
    """

    def __init__(
        self,
        bundle_root: str,
        settings: dict,
        datalist_dir: Optional[str] = None,
        datalist: Optional[str] = None,
        bundle_overrides: Optional[dict] = None,
        local_epochs: int = 1,
        local_steps: Optional[int] = None,
        state_name: Optional[str] = None,
        state_dir: Optional[str] = None,
        resume: bool = False,
        on_state_mismatch: str = "refuse",
        allow_random_base: bool = False,
        prefix_cache: str = "auto",
        device: str = "auto",
        amp: bool = True,
        seed: int = 0,
        export_bundles: bool = True,
        lora_aggregation: str = "factors",
        task: str = "auto",
        bundle_ids: Optional[dict] = None,
        differential_privacy: Optional[dict] = None,
        train_task: str = AppConstants.TASK_TRAIN,
        validate_task: str = AppConstants.TASK_VALIDATION,
        submit_model_task: str = AppConstants.TASK_SUBMIT_MODEL,
    ):
        super().__init__()
        self.bundle_root = bundle_root
        self.settings = dict(settings)
        self.datalist_dir = datalist_dir
        self.datalist = datalist
        self.bundle_overrides = dict(bundle_overrides or {})
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.state_name = state_name
        self.state_dir = state_dir
        self.resume = resume
        self.on_state_mismatch = on_state_mismatch
        self.allow_random_base = allow_random_base
        self.prefix_cache = prefix_cache
        self.device = device
        self.amp = amp
        self.seed = seed
        self.export_bundles = export_bundles
        self.lora_aggregation = lora_aggregation
        self.task = task
        self.bundle_ids = dict(bundle_ids) if bundle_ids else None
        self.differential_privacy = dict(differential_privacy) if differential_privacy else None
        self.train_task = train_task
        self.validate_task = validate_task
        self.submit_model_task = submit_model_task
        # fail at configuration time on a bad setting
        self._settings = AdapterSettings.from_dict(self.settings)
        for problem in (int_setting_problem("local_epochs", local_epochs),
                        int_setting_problem("local_steps", local_steps, optional=True)):
            if problem:
                raise ValueError(problem)
        if on_state_mismatch not in MISMATCH_MODES:
            raise ValueError(f"setting 'on_state_mismatch' = {on_state_mismatch!r}: expected one of {MISMATCH_MODES}")
        from flare_duallora.training.tasks import TASK_SETTINGS

        if task not in TASK_SETTINGS:
            raise ValueError(f"setting 'task' = {task!r}: expected one of {TASK_SETTINGS}")
        if prefix_cache not in CACHE_MODES:
            raise ValueError(f"setting 'prefix_cache' = {prefix_cache!r}: expected one of {CACHE_MODES}")
        if datalist_dir and datalist:
            raise ValueError("give 'datalist_dir' or 'datalist', not both")
        if state_name is not None:
            check_simple_name(state_name, "state_name")
        from flare_duallora.engine.lora_aggregation import LORA_AGGREGATION_MODES

        if lora_aggregation not in LORA_AGGREGATION_MODES:
            raise ValueError(f"setting 'lora_aggregation' = {lora_aggregation!r}: expected one of "
                             f"{LORA_AGGREGATION_MODES}")
        from flare_duallora.training.privacy import DPSettings, check_method_settings

        if DPSettings.from_dict(self.differential_privacy) and check_method_settings(self._settings):
            raise ValueError(check_method_settings(self._settings))
        self.site = None  # a SiteBuild once START_RUN succeeded
        self._failure: Optional[str] = None
        self._site_name = ""
        self._state_path: Optional[Path] = None
        self._records_path: Optional[Path] = None
        self._rolled_back = False
        self._base_fingerprint: Optional[str] = None
        self._fedex_total: dict = {}  # lora_aggregation = fedex: the residuals folded into the base so far
        self._fingerprints: list = []  # the fingerprints before each folded round (to take a round back out)
        self._policy = SitePolicy()
        self._last_global: Optional[dict] = None  # the shared part of the last global model received (max_global_shift)
        self._owner: dict = {}

    # ------------------------------------------------------------------ lifecycle
    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            try:
                self._start(fl_ctx)
            except Exception as e:  # FLARE swallows it: keep the cause and answer every task with it
                self._failure = _cause(fl_ctx.get_identity_name(), e)
                self.log_error(fl_ctx, f"site failed to start: {self._failure}")
                self._record({"event": "failed_to_start", "cause": self._failure})

    def _start(self, fl_ctx: FLContext) -> None:
        from flare_duallora.training.from_bundle import build_site  # heavy imports only on the site

        self._site_name = site = fl_ctx.get_identity_name()
        job_id = fl_ctx.get_job_id()
        workspace = fl_ctx.get_engine().get_workspace()
        root = workspace.get_root_dir()
        self._records_path = Path(workspace.get_run_dir(job_id)) / SITE_RECORDS_FILE
        self._policy = policy = SitePolicy.load(workspace.get_site_config_dir())
        if not policy.allow_job_code:
            code = code_in_overrides(self.bundle_overrides)
            if code:
                raise SitePolicyError(
                    f"the job's bundle_overrides hold config expressions or components, which would run job-supplied "
                    f"code on this site: {'; '.join(code[:5])}. Use plain values, or allow it in this site's "
                    f"local/flare_duallora.json ('allow_job_code': true)")
        policy.check_override_ids(self.bundle_overrides)
        cwd = os.getcwd()
        bundle = policy.bundle_folder(self.bundle_root, job_dir=workspace.get_run_dir(job_id), base=cwd,
                                      workspace=root)
        if not bundle.is_dir():
            raise FileNotFoundError(f"setting 'bundle_root' = {self.bundle_root!r}: no bundle folder on this site")
        if not policy.allow_job_code:
            from flare_duallora.bundle.runtime import replaced_components

            replaced = replaced_components(bundle, self.bundle_overrides)
            if replaced:
                raise SitePolicyError(
                    f"the job's bundle_overrides {replaced} replace whole components of the site's bundle (set a "
                    f"component's arguments instead, e.g. 'network_def#hidden_size'), or allow it in this site's "
                    f"local/flare_duallora.json ('allow_job_code': true)")
        if self.datalist:
            datalist = str(policy.data_path(self.datalist, "datalist", cwd, root))
        elif self.datalist_dir:
            folder = policy.data_path(self.datalist_dir, "datalist_dir", cwd, root)
            datalist = str(folder / f"{site}.json")
            if not Path(datalist).is_file():
                raise FileNotFoundError(f"setting 'datalist_dir' = {self.datalist_dir!r}: it holds no {site}.json "
                                        f"(every site needs <datalist_dir>/<site name>.json)")
        else:
            datalist = None
        job_name = self._job_name(fl_ctx)
        if job_name is not None:
            check_simple_name(job_name, "job name")
        key = check_simple_name(self.state_name or job_name or job_id, "state_name")
        if self.state_dir:
            given = _fill(self.state_dir, {"site": site, "job": job_id, "key": key})
            state_dir = policy.check_state_dir(resolve_site_path(given, "state_dir", cwd, must_exist=False), root,
                                               given=self.state_dir)
        else:
            state_dir = policy.state_dir(workspace.get_site_config_dir(), site, key)
        self._owner = {"job": job_name or job_id, "submitter": self._submitter(fl_ctx)}
        self._claim_state_dir(state_dir)
        self._state_path = state_dir / SITE_STATE_FILE

        self.site = build_site(str(bundle), self._settings, datalist, self.bundle_overrides, self.device, self.amp,
                               self.seed, allow_random_base=self.allow_random_base, task=self.task,
                               bundle_ids=self.bundle_ids)
        self._base_fingerprint = self.site.fingerprint  # of the bundle's base, before any fedex residual
        adapted = self.site.adapted
        self.log_info(fl_ctx, f"{site}: method={adapted.settings.method} adapted {len(adapted.targets)} modules, "
                              f"{len(adapted.shared_keys)} shared / {len(adapted.private_keys)} private keys on "
                              f"{self.site.trainer.device}; base {self.site.base_source}; {self.site.fingerprint}")
        self._record({"event": "started", "fingerprint": self.site.fingerprint, "base": self.site.base_source,
                      "task": self.site.task,
                      "dataset_size": self.site.dataset_size, "state_file": str(self._state_path)})
        from flare_duallora.training.privacy import install_training_step

        step = install_training_step(self.site.trainer, self.differential_privacy, self.site.train_dataset,
                                     self.site.runtime.batch_size, self.local_epochs, self.local_steps, self.seed,
                                     self._settings)
        if step.report() is not None:
            self.log_info(fl_ctx, f"{site}: differential privacy: {step.guarantee()} (at the end of the job)")
            self._record({"event": "differential_privacy", **step.state()})
        self._restore_or_start_fresh(fl_ctx)
        decision = self.site.trainer.configure_cache(self.prefix_cache, self.site.train_dataset)
        self.log_info(fl_ctx, f"{site}: frozen-prefix cache {'on' if decision.enabled else 'off'}: {decision.reason}")
        self._record({"event": "prefix_cache", "enabled": decision.enabled, "reason": decision.reason})

    @staticmethod
    def _job_meta(fl_ctx: FLContext) -> dict:
        from nvflare.apis.fl_constant import FLContextKey

        meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        return meta if isinstance(meta, dict) else {}

    def _job_name(self, fl_ctx: FLContext) -> Optional[str]:
        return self._job_meta(fl_ctx).get("name")

    def _submitter(self, fl_ctx: FLContext) -> Optional[str]:
        value = self._job_meta(fl_ctx).get("submitter_name")
        return value if isinstance(value, str) else None

    def _claim_state_dir(self, state_dir: Path) -> None:
        """A state folder belongs to the job (name and submitter) that created it: another job may neither resume
        nor move aside what it holds.  A folder with state but no owner record is not touched either."""
        import json

        owner_file = state_dir / STATE_OWNER_FILE
        if owner_file.is_file():
            try:
                owner = json.loads(owner_file.read_text())
            except ValueError:
                owner = None
            if owner != self._owner:
                raise SitePolicyError(
                    f"setting 'state_name' = {state_dir.name!r}: that state was created by another job (or submitter); "
                    f"a job only resumes or replaces state it created; nothing was read or moved")
            return
        if (state_dir / SITE_STATE_FILE).exists() or (state_dir / SITE_STATE_PREV_FILE).exists():
            raise SitePolicyError(
                f"setting 'state_name' = {state_dir.name!r}: that state has no record of the job that created it; "
                f"nothing was read or moved (the site's operator may remove the folder)")
        state_dir.mkdir(parents=True, exist_ok=True)
        owner_file.write_text(json.dumps(self._owner))

    def _state(self) -> dict:
        trainer = self.site.trainer
        return {"private": trainer.adapted.private_state(), "optimizer": trainer.optimizer.state_dict(),
                "rounds_done": trainer.rounds_done, "settings": self._settings.to_dict(),
                "fingerprint": self._base_fingerprint, "fingerprint_now": self.site.fingerprint,
                "fedex_total": dict(self._fedex_total), "fingerprints": list(self._fingerprints),
                "job": self._owner.get("job"), "submitter": self._owner.get("submitter"),
                "last_global": dict(self._last_global or {}),
                **({"privacy": trainer.training_step.state()} if trainer.training_step.state() else {})}

    def _restore_or_start_fresh(self, fl_ctx: FLContext) -> None:
        from flare_duallora.training.site_state import archive

        path = self._state_path
        if not path.is_file():
            return
        if not self.resume:
            ledger = self._continue_privacy_ledger(path)  # checked before anything is moved
            prev = path.with_name(SITE_STATE_PREV_FILE)
            if prev.is_file():
                archive(prev, "replaced")
            moved = archive(path, "replaced")
            self.log_warning(fl_ctx, f"{self._site_name}: a new federation (resume = false): the previous private "
                                     f"state {path} was moved to {moved}")
            self._record({"event": "archived", "file": str(moved), "why": "resume = false"})
            if ledger is not None:
                self._save_state()  # the continued count is on disk before any round (a crash cannot reset it)
                step = self.site.trainer.training_step
                self.log_warning(fl_ctx, f"{self._site_name}: differential privacy: this state name's earlier "
                                         f"federation spent epsilon {step.epsilon():.4g} of {step.settings.epsilon:g} "
                                         f"({step.steps_spent} steps); this job continues that count")
                self._record({"event": "privacy_ledger_continued", "from": str(moved), "steps": step.steps_spent,
                              "epsilon": step.epsilon()})
            return
        try:
            self._restore(path)
        except (ValueError, KeyError) as e:
            if self.on_state_mismatch == "refuse":
                raise
            moved = archive(path, "mismatch")
            self.log_warning(fl_ctx, f"{self._site_name}: {e}; on_state_mismatch = reset: moved it to {moved} and "
                                     f"starting fresh")
            self._record({"event": "archived", "file": str(moved), "why": str(e)})

    def _continue_privacy_ledger(self, path: Path) -> Optional[dict]:
        """A DP job that starts a new federation (resume = false) under a state name whose state holds a privacy
        ledger continues that count: the privacy guarantee covers everything this site released under the state
        name, not one submission of it.  The saved ledger must have this job's DP settings (else the job is refused
        and nothing is moved); a job without DP, or a state without a ledger, starts as before."""
        from flare_duallora.training.privacy import PrivacyError
        from flare_duallora.training.site_state import StateFileError, load_state_file

        step = self.site.trainer.training_step
        if step.report() is None:
            return None
        try:
            entry = load_state_file(path).get("privacy")
        except StateFileError as e:
            raise PrivacyError(f"{path}: its differential-privacy ledger cannot be read ({e}), so a new federation "
                               f"under this state name cannot continue it; nothing was moved") from None
        if not entry:
            return None
        step.load_state(entry, rounds_done=0, source=f"{path} (a new federation under the same state name continues "
                                                     f"its privacy ledger; use the same differential_privacy settings)")
        return entry

    def _restore(self, path: Path) -> None:
        from flare_duallora.training.site_state import StateFileError, file_sha256, load_state_file, settings_mismatch

        state = load_state_file(path)
        problems = settings_mismatch(state.get("settings") or {}, self._settings.to_dict())
        if state.get("fingerprint") != self._base_fingerprint:
            problems.append(f"base fingerprint: saved {state.get('fingerprint')}, job {self._base_fingerprint}")
        for what in ("job", "submitter"):
            if state.get(what) != self._owner.get(what):
                problems.append(f"{what}: saved {state.get(what)!r}, this job {self._owner.get(what)!r}")
        if problems:
            raise StateFileError(f"{path} was saved by a different job set-up ({'; '.join(problems)}); the file "
                                 f"was left as it is (set on_state_mismatch = 'reset' to start fresh)")
        trainer = self.site.trainer
        try:
            trainer.load_site_state(state, source=str(path))
        except (StateError, ValueError, KeyError, RuntimeError) as e:
            raise StateFileError(f"{path} does not fit this job: {e}; the file was left as it is") from None
        self._set_fedex_state(state)
        last = state.get("last_global")
        self._last_global = {k: torch.as_tensor(v).float() for k, v in last.items()} if isinstance(last, dict) and \
            last else None  # max_global_shift bounds the first global after a resume too
        self._record({"event": "restored", "file": str(path), "rounds_done": trainer.rounds_done,
                      "sha256": file_sha256(path), "private_checksum": state_checksum(trainer.adapted.private_state())})

    def _set_fedex_state(self, state: dict) -> None:
        """Make the base hold exactly the fedex residuals a state file was saved with (restore, roll-back)."""
        from flare_duallora.engine.lora_aggregation import fold_residuals

        total = {k: torch.as_tensor(v) for k, v in (state.get("fedex_total") or {}).items()}
        delta = {k: total.get(k, 0) - self._fedex_total.get(k, 0) for k in set(total) | set(self._fedex_total)}
        delta = {k: v for k, v in delta.items() if isinstance(v, torch.Tensor)}
        if delta:
            fold_residuals(self.site.adapted.net, delta)
        self._fedex_total = total
        self._fingerprints = list(state.get("fingerprints") or [])
        self.site.fingerprint = state.get("fingerprint_now") or self._base_fingerprint

    def _save_state(self) -> str:
        from flare_duallora.training.site_state import save_state_file

        return save_state_file(self._state_path, self._state(), prev_name=SITE_STATE_PREV_FILE)

    def _record(self, entry: dict) -> None:
        if self._records_path is None:
            return
        append_jsonl(self._records_path, {"site": self._site_name, "time": time.time(), **entry})

    # ------------------------------------------------------------------ tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._failure is not None:
            return self._error(ReturnCode.EXECUTION_EXCEPTION, self._failure)
        if self.site is None:
            return self._error(ReturnCode.EXECUTION_EXCEPTION, f"{fl_ctx.get_identity_name()}: the executor was not "
                                                               f"started (no START_RUN event)")
        # what this site may send (its shared keys' shapes, its bundle's class labels): the result filter builds the
        # outgoing result from it
        fl_ctx.set_prop(OUTBOUND_PROP, self._outbound(), private=True, sticky=False)
        try:
            if task_name == self.train_task:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task:
                return self._validate(shareable, fl_ctx)
            if task_name == self.submit_model_task:
                return DXO(DataKind.WEIGHTS, data=_to_wire(self.site.adapted.shared_state())).to_shareable()
            return self._error(ReturnCode.TASK_UNKNOWN, f"{self._site_name}: unknown task {task_name!r}")
        except GlobalModelError as e:
            self.log_error(fl_ctx, f"{self._site_name}: refused the task data of {task_name!r}: {e}")
            return self._error(ReturnCode.BAD_TASK_DATA, _cause(self._site_name, e))
        except Exception as e:  # noqa: BLE001 - every failure is answered with its cause
            self.log_exception(fl_ctx, f"{self._site_name}: task {task_name!r} failed: {e}")
            return self._error(ReturnCode.EXECUTION_EXCEPTION, _cause(self._site_name, e))

    def _outbound(self) -> dict:
        adapted, trainer = self.site.adapted, self.site.trainer
        own = adapted.net.state_dict()
        shapes = {k: tuple(own[k].shape) for k in adapted.shared_keys}
        return describe_outbound(shapes, trainer.num_classes or adapted.num_classes(), trainer.label_names)

    def _error(self, rc: str, cause: str) -> Shareable:
        reply = make_reply(rc)
        reply.set_header(CAUSE_HEADER, cause)
        self._record({"event": "error", "return_code": rc, "cause": cause})
        return reply

    def _receive(self, shareable: Shareable) -> tuple[dict, dict]:
        """The received shared weights and fedex residuals, checked whole before anything changes (kind, keys,
        shapes, finite)."""
        try:
            dxo = from_shareable(shareable)
        except Exception as e:  # noqa: BLE001
            raise GlobalModelError(f"task data is not a DXO ({type(e).__name__})") from None
        if dxo.data_kind != DataKind.WEIGHTS:
            raise GlobalModelError(f"expected WEIGHTS from the server, got {dxo.data_kind}")
        data = dxo.data or {}
        if not isinstance(data, dict):
            raise GlobalModelError("the task data holds no dict of weights")
        own = self.site.adapted.shared_state()
        weights = {}
        for k, v in data.items():
            if not isinstance(k, str):
                raise GlobalModelError(f"key {k!r} is not a string")
            try:
                t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
            except Exception:  # noqa: BLE001 - strings, objects
                raise GlobalModelError(f"{k}: not a numeric array") from None
            if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
                raise GlobalModelError(f"{k}: dtype {t.dtype} is not numeric")
            if k in own:  # finiteness in the network's own dtype: a float64 1e300 is inf in float32
                t = t.to(own[k].dtype)
            if not bool(torch.isfinite(t).all()):
                raise GlobalModelError(f"{k}: the global model holds non-finite values (NaN or Inf, in the network's "
                                       f"dtype); nothing was loaded and the private state is unchanged")
            weights[k] = t
        if weights:
            try:
                self.site.adapted.check_shared(weights, source=f"global model received by {self._site_name}")
            except StateError as e:
                raise GlobalModelError(str(e)) from None
            self._check_shift(weights)
        residuals = self._check_residuals((dxo.meta or {}).get(FEDEX_META))
        if weights:
            self._last_global = {k: v.detach().float().clone() for k, v in weights.items()}
        return weights, residuals

    def _check_shift(self, weights: dict) -> None:
        """The site's ``max_global_shift``: how far a received global's shared part may move from the previous one
        this site received (relative Frobenius norm over all shared keys)."""
        bound, prev = self._policy.max_global_shift, self._last_global
        if bound is None or not prev or set(prev) != set(weights):
            return
        diff = math.sqrt(sum(float((weights[k].float() - prev[k]).pow(2).sum()) for k in weights))
        norm = math.sqrt(sum(float(prev[k].pow(2).sum()) for k in prev))
        shift = diff / max(norm, 1e-12)
        if shift > bound:
            raise GlobalModelError(f"the global model moved {shift:.3g} (relative norm) from the previous one this "
                                   f"site received, more than this site's max_global_shift {bound}; nothing was "
                                   f"loaded")

    def _check_residuals(self, residuals) -> dict:
        """fedex residuals: only in a fedex job; one per adapted base weight, shaped like it, finite in the weight's
        dtype and bounded (else nothing is folded)."""
        from flare_duallora.engine.lora_aggregation import check_residuals

        if residuals is None or (isinstance(residuals, dict) and not residuals):
            return {}
        if self.lora_aggregation != "fedex":
            raise GlobalModelError(f"the server sent fedex residuals, but this job's lora_aggregation is "
                                   f"{self.lora_aggregation!r}: a site folds residuals into its base only in a fedex "
                                   f"job; nothing was changed")
        try:
            return check_residuals(self.site.adapted.net, residuals)
        except (KeyError, ValueError) as e:
            raise GlobalModelError(f"{e.args[0] if e.args else e}; nothing was folded") from None

    def _fold(self, residuals: dict, sign: float = 1.0) -> None:
        """Fold fedex residuals into the frozen base (``sign = -1`` takes them out again), keeping the running total
        and the base fingerprint in step with the server's."""
        from flare_duallora.engine.fingerprint import chain_fingerprint
        from flare_duallora.engine.lora_aggregation import fold_residuals

        if not residuals:
            return
        fold_residuals(self.site.adapted.net, {k: sign * v for k, v in residuals.items()})
        for key, value in residuals.items():
            value = value.float()
            self._fedex_total[key] = self._fedex_total.get(key, torch.zeros_like(value)) + sign * value
        if sign > 0:
            self._fingerprints.append(self.site.fingerprint)
            self.site.fingerprint = chain_fingerprint(self.site.fingerprint,
                                                      {k: v.float().cpu().numpy() for k, v in residuals.items()})
        else:
            self.site.fingerprint = self._fingerprints.pop()

    def _check_round(self, current_round: int) -> None:
        """The saved state must be the one the server's round continues from (after a resume or a rerun)."""
        from flare_duallora.training.site_state import StateFileError, load_state_file

        trainer = self.site.trainer
        done = trainer.rounds_done
        if done <= current_round:
            return  # in step, or this site missed rounds (it failed one, or joined late): it trains from here
        prev = self._state_path.with_name(SITE_STATE_PREV_FILE)
        if done == current_round + 1 and prev.is_file() and not self._rolled_back:
            state = load_state_file(prev)
            if int(state.get("rounds_done", -1)) == current_round:
                # the site completed this round but the server did not: continue from the state before it
                trainer.load_site_state(state, source=str(prev))  # its rounds_done is current_round
                self._set_fedex_state(state)
                self._rolled_back = True
                self._record({"event": "rolled_back", "file": str(prev), "rounds_done": current_round,
                              "private_checksum": state_checksum(trainer.adapted.private_state())})
                return
        raise StateFileError(
            f"{self._state_path} holds {done} completed round(s) but the server started round {current_round}: its "
            f"private adapters are ahead of the global model. The file was left as it is; resume the server too "
            f"(same state name, resume = true) or set on_state_mismatch = 'reset' / another state name")

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        current_round = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0)
        received, residuals = self._receive(shareable)  # raises before any state changes
        self._check_round(current_round)
        trainer = self.site.trainer
        before = state_checksum(trainer.adapted.private_state())
        snapshot = trainer.snapshot()
        if received:
            trainer.adapted.load_shared(received, source=f"global model received by {self._site_name}")
        self._fold(residuals)
        initial = trainer.evaluate(kinds=("global_only",))["global_only"]
        stats = trainer.train_round(self.local_epochs, self.local_steps, lambda: abort_signal.triggered)
        if abort_signal.triggered:
            trainer.restore(snapshot)
            self._fold(residuals, -1.0)
            return make_reply(ReturnCode.TASK_ABORTED)
        if not math.isfinite(stats.loss) or not trainer.trainable_finite():
            trainer.restore(snapshot)
            self._fold(residuals, -1.0)
            raise FloatingPointError(f"round {current_round}: the training loss became non-finite ({stats.loss}); the "
                                     f"round was abandoned, the weights rolled back and nothing was saved")
        personalised = trainer.evaluate(kinds=("personalised",))["personalised"]
        shared = trainer.adapted.shared_state()
        sent = payload_bytes(shared)
        sha = self._save_state()
        privacy = trainer.training_step.report()
        metrics = {GLOBAL_RECEIVED: initial, PERSONALISED_TRAINED: personalised}
        self._record({
            "event": "train", "round": current_round, "received_keys": len(received),
            "received_checksum": state_checksum(received) if received else None, "sent_keys": len(shared),
            "bytes_sent": sent, "private_checksum_before": before,
            "private_checksum_after": state_checksum(trainer.adapted.private_state()), "state_sha256": sha,
            "rounds_done": trainer.rounds_done, **stats.as_dict(), "dataset_size": self.site.dataset_size,
            "metrics": metrics, **({"privacy": privacy} if privacy else {}),
        })
        headline = trainer.task.headline
        spent = f", epsilon spent {privacy['epsilon']:.3g} of {privacy['target_epsilon']:g}" if privacy else ""
        self.log_info(
            fl_ctx,
            f"{self._site_name} round {current_round}: {stats.steps} steps, loss {stats.loss:.4f}, sent {sent} bytes, "
            f"{headline} global-only (received) {_fmt(initial.get(headline))}, "
            f"personalised (after training) {_fmt(personalised.get(headline))}{spent}",
        )
        meta = {
            MetaKey.NUM_STEPS_CURRENT_ROUND: stats.steps,
            MetaKey.INITIAL_METRICS: {GLOBAL_RECEIVED: initial},
            "num_examples": stats.examples,
            "dataset_size": self.site.dataset_size,
            "loss": stats.loss,
            "bytes_sent": sent,
            "site_metrics": metrics,
            FINGERPRINT_META: self.site.fingerprint,
        }
        if privacy:
            meta[PRIVACY_META] = privacy
        return DXO(DataKind.WEIGHTS, data=_to_wire(shared), meta=meta).to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        received, residuals = self._receive(shareable)
        if received:
            self.site.adapted.load_shared(received, source=f"global model received by {self._site_name}")
        self._fold(residuals)
        metrics = self.site.trainer.evaluate()
        entry = {"event": "validate", "received_keys": len(received),
                 "received_checksum": state_checksum(received) if received else None, "metrics": metrics}
        privacy = self.site.trainer.training_step.report()
        if privacy:
            entry["privacy"] = privacy
        if self.export_bundles:
            entry["bundles"] = self._export(fl_ctx)
        self._record(entry)
        flat = {f"{kind}/{name}": value for kind, m in metrics.items() for name, value in m.items()}
        meta = {FINGERPRINT_META: self.site.fingerprint, **({PRIVACY_META: privacy} if privacy else {})}
        return DXO(DataKind.METRICS, data=flat, meta=meta).to_shareable()

    def _export(self, fl_ctx: FLContext) -> dict:
        from flare_duallora.training.from_bundle import export_site_bundles

        details = {"rounds": self.site.trainer.rounds_done}
        step = self.site.trainer.training_step
        if step.report():  # the guarantee of the weights the bundles hold
            details.update(differential_privacy=step.report(), privacy_guarantee=step.guarantee())
        try:
            paths = export_site_bundles(self.site, self._state_path.parent / "bundles", self._site_name,
                                        details=details)
        except Exception as e:  # noqa: BLE001 - an export failure must not fail the validation
            self.log_exception(fl_ctx, f"{self._site_name}: bundle export failed: {e}")
            return {"error": str(e)}
        self.log_info(fl_ctx, f"{self._site_name}: exported personalised and global-only bundles to {paths}")
        return {k: str(v) for k, v in paths.items()}
