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

from flare_duallora.bundle.paths import code_in_overrides, resolve_bundle_path, resolve_site_path
from flare_duallora.engine import AdapterSettings, StateError
from flare_duallora.engine.settings import int_setting_problem
from flare_duallora.engine.state import payload_bytes
from flare_duallora.flare.run_files import (
    CAUSE_HEADER, FEDEX_META, FINGERPRINT_META, PRIVACY_META, SITE_RECORDS_FILE, SITE_STATE_FILE, SITE_STATE_PREV_FILE, append_jsonl,
)
from flare_duallora.flare.site_policy import SitePolicy, SitePolicyError
from flare_duallora.training.site import state_checksum

MISMATCH_MODES = ("refuse", "reset")
CACHE_MODES = ("auto", "on", "off")
# per-round metrics, named for what they measure
GLOBAL_RECEIVED = "global_only_received"  # the received global model (private adapters off), before local training
PERSONALISED_TRAINED = "personalised_after_training"  # the site's own model after this round's local training
MAX_CAUSE = 1500


class GlobalModelError(ValueError):
    """The server's task data cannot be used (wrong kind, keys, shapes or non-finite values)."""


def _to_wire(state: dict) -> dict:
    """numpy arrays on the wire: FLARE's FOBS serialises them with no extra decomposer on either side."""
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _cause(site: str, err: BaseException) -> str:
    text = f"{site}: {type(err).__name__}: {err}"
    return text if len(text) <= MAX_CAUSE else text[:MAX_CAUSE] + " ..."


class DualLoRAExecutor(Executor):
    """Personalised LoRA training of a MONAI bundle on one FLARE site.

    Args:
        bundle_root: the MONAI bundle (``configs/train.json``, ``models/model.pt``); ``pkg://<package>/<folder>``
            names a folder of an installed package.  Must be absolute on the site (the job builders resolve it).
        settings: :class:`~flare_duallora.engine.AdapterSettings` fields (method, target_modules, blocks, rank,
            head, seed, ...), validated here once.
        datalist_dir / datalist: the folder holding ``<site name>.json``, or this site's datalist file.
        bundle_overrides: plain bundle config overrides (``{"image_size": [32, 32, 8]}``); expressions are refused
            unless the site's ``local/flare_duallora.json`` says ``allow_job_code``.
        local_epochs / local_steps: local work per round (steps wins when set).
        state_name: the stable name private state is kept under (default: the job's name); ``resume``: continue from
            the state saved under that key (the server resumes its rounds likewise).  Without ``resume`` an
            existing state file is moved aside, never overwritten.
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
        if prefix_cache not in CACHE_MODES:
            raise ValueError(f"setting 'prefix_cache' = {prefix_cache!r}: expected one of {CACHE_MODES}")
        if datalist_dir and datalist:
            raise ValueError("give 'datalist_dir' or 'datalist', not both")
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
        policy = SitePolicy.load(workspace.get_site_config_dir())
        if not policy.allow_job_code:
            code = code_in_overrides(self.bundle_overrides)
            if code:
                raise SitePolicyError(
                    f"the job's bundle_overrides hold config expressions or components, which would run job-supplied "
                    f"code on this site: {'; '.join(code[:5])}. Use plain values, or allow it in this site's "
                    f"local/flare_duallora.json ('allow_job_code': true)")
        cwd = os.getcwd()
        bundle = resolve_bundle_path(self.bundle_root, base=cwd)
        if not Path(bundle).is_dir():
            how = "" if os.path.isabs(os.path.expanduser(self.bundle_root)) else \
                f" (a relative path, resolved against {cwd}, the site's working folder)"
            raise FileNotFoundError(f"setting 'bundle_root' = {self.bundle_root!r}: no bundle folder at {bundle}{how}")
        if self.datalist:
            datalist = resolve_site_path(self.datalist, "datalist", cwd)
        elif self.datalist_dir:
            folder = resolve_site_path(self.datalist_dir, "datalist_dir", cwd)
            datalist = str(Path(folder) / f"{site}.json")
            if not Path(datalist).is_file():
                raise FileNotFoundError(f"datalist {datalist} does not exist (setting 'datalist_dir' = "
                                        f"{self.datalist_dir!r}; every site needs <datalist_dir>/<site name>.json)")
        else:
            datalist = None
        key = self.state_name or self._job_name(fl_ctx) or job_id
        if self.state_dir:
            state_dir = policy.check_state_dir(
                resolve_site_path(self.state_dir.format(site=site, job=job_id, key=key), "state_dir", cwd,
                                  must_exist=False), root)
        else:
            state_dir = policy.state_dir(workspace.get_site_config_dir(), site, key)
        state_dir.mkdir(parents=True, exist_ok=True)
        self._state_path = state_dir / SITE_STATE_FILE

        self.site = build_site(bundle, self._settings, datalist, self.bundle_overrides, self.device, self.amp,
                               self.seed, allow_random_base=self.allow_random_base)
        self._base_fingerprint = self.site.fingerprint  # of the bundle's base, before any fedex residual
        adapted = self.site.adapted
        self.log_info(fl_ctx, f"{site}: method={adapted.settings.method} adapted {len(adapted.targets)} modules, "
                              f"{len(adapted.shared_keys)} shared / {len(adapted.private_keys)} private keys on "
                              f"{self.site.trainer.device}; base {self.site.base_source}; {self.site.fingerprint}")
        self._record({"event": "started", "fingerprint": self.site.fingerprint, "base": self.site.base_source,
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
    def _job_name(fl_ctx: FLContext) -> Optional[str]:
        from nvflare.apis.fl_constant import FLContextKey

        meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        return meta.get("name") if isinstance(meta, dict) else None

    def _state(self) -> dict:
        trainer = self.site.trainer
        return {"private": trainer.adapted.private_state(), "optimizer": trainer.optimizer.state_dict(),
                "rounds_done": trainer.rounds_done, "settings": self._settings.to_dict(),
                "fingerprint": self._base_fingerprint, "fingerprint_now": self.site.fingerprint,
                "fedex_total": dict(self._fedex_total), "fingerprints": list(self._fingerprints),
                **({"privacy": trainer.training_step.state()} if trainer.training_step.state() else {})}

    def _restore_or_start_fresh(self, fl_ctx: FLContext) -> None:
        from flare_duallora.training.site_state import archive

        path = self._state_path
        if not path.is_file():
            return
        if not self.resume:
            prev = path.with_name(SITE_STATE_PREV_FILE)
            if prev.is_file():
                archive(prev, "replaced")
            moved = archive(path, "replaced")
            self.log_warning(fl_ctx, f"{self._site_name}: a new federation (resume = false): the previous private "
                                     f"state {path} was moved to {moved}")
            self._record({"event": "archived", "file": str(moved), "why": "resume = false"})
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

    def _restore(self, path: Path) -> None:
        from flare_duallora.training.site_state import StateFileError, file_sha256, load_state_file, settings_mismatch

        state = load_state_file(path)
        problems = settings_mismatch(state.get("settings") or {}, self._settings.to_dict())
        if state.get("fingerprint") != self._base_fingerprint:
            problems.append(f"base fingerprint: saved {state.get('fingerprint')}, job {self._base_fingerprint}")
        if problems:
            raise StateFileError(f"{path} was saved by a different job set-up ({'; '.join(problems)}); the file "
                                 f"was left as it is (set on_state_mismatch = 'reset' to start fresh)")
        trainer = self.site.trainer
        try:
            trainer.load_site_state(state, source=str(path))
        except (StateError, ValueError, KeyError, RuntimeError) as e:
            raise StateFileError(f"{path} does not fit this job: {e}; the file was left as it is") from None
        self._set_fedex_state(state)
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
        weights = {}
        for k, v in (dxo.data or {}).items():
            try:
                t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
            except Exception:  # noqa: BLE001 - strings, objects
                raise GlobalModelError(f"{k}: not a numeric array") from None
            if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
                raise GlobalModelError(f"{k}: dtype {t.dtype} is not numeric")
            if not bool(torch.isfinite(t).all()):
                raise GlobalModelError(f"{k}: the global model holds non-finite values (NaN or Inf); nothing was "
                                       f"loaded and the private state is unchanged")
            weights[k] = t
        if weights:
            try:
                self.site.adapted.check_shared(weights, source=f"global model received by {self._site_name}")
            except StateError as e:
                raise GlobalModelError(str(e)) from None
        return weights, self._check_residuals((dxo.meta or {}).get(FEDEX_META) or {})

    def _check_residuals(self, residuals: dict) -> dict:
        """fedex residuals: one per adapted base weight, shaped like it, finite (else nothing is folded)."""
        if not isinstance(residuals, dict):
            raise GlobalModelError("fedex residuals: expected a dict of arrays")
        own = self.site.adapted.net.state_dict()
        allowed = {f"{t}.base_layer.weight" for t in self.site.adapted.targets}
        out = {}
        for key, value in residuals.items():
            if key not in allowed:
                raise GlobalModelError(f"fedex residual for {key!r}, which is not an adapted base weight")
            try:
                t = torch.as_tensor(value, dtype=torch.float32)
            except Exception:  # noqa: BLE001
                raise GlobalModelError(f"fedex residual {key}: not a numeric array") from None
            if t.numel() != own[key].numel() or not bool(torch.isfinite(t).all()):
                raise GlobalModelError(f"fedex residual {key}: shape {tuple(t.shape)} or values do not fit")
            out[key] = t
        return out

    def _fold(self, residuals: dict, sign: float = 1.0) -> None:
        """Fold fedex residuals into the frozen base (``sign = -1`` takes them out again), keeping the running total
        and the base fingerprint in step with the server's."""
        from flare_duallora.engine.fingerprint import chain_fingerprint
        from flare_duallora.engine.lora_aggregation import fold_residuals

        if not residuals:
            return
        fold_residuals(self.site.adapted.net, {k: sign * v for k, v in residuals.items()})
        for key, value in residuals.items():
            self._fedex_total[key] = self._fedex_total.get(key, torch.zeros_like(value)) + sign * value
        if sign > 0:
            self._fingerprints.append(self.site.fingerprint)
            self.site.fingerprint = chain_fingerprint(self.site.fingerprint, {k: v.numpy() for k, v in residuals.items()})
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
        spent = f", epsilon spent {privacy['epsilon']:.3g} of {privacy['target_epsilon']:g}" if privacy else ""
        self.log_info(
            fl_ctx,
            f"{self._site_name} round {current_round}: {stats.steps} steps, loss {stats.loss:.4f}, sent {sent} bytes, "
            f"BA global-only (received) {initial['balanced_accuracy']:.3f}, "
            f"personalised (after training) {personalised['balanced_accuracy']:.3f}{spent}",
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
