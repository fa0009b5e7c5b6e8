"""Server workflow: rounds of validated, bounded FedAvg over shared keys, a final per-site validation, and a run
that fails when more sites fail than the job tolerates.

The server never needs the network or the bundle: the global model is the dict of shared keys, empty before
round 0 (every site starts from the same seeded adapters).  What it writes is listed in
:mod:`flare_duallora.flare.run_files`.

A site **fails** when it answers a task with an error (its cause travels in the reply), when the server rejects its
contribution (the reason is logged and written to ``communication.json``), or when it does not answer.  The run
fails, with every failed site and its cause in the server log and ``run_status.json``, as soon as more sites
have failed than ``max_failed_sites`` (default 0) allows.

**Resume**: after every completed round the global shared state and the round index are saved atomically to
``server_state.pt`` in the server's state folder (``<workspace>/local/flare_duallora_state/<state name>/``, or under
the ``state_root`` of its ``local/flare_duallora.json``; see :mod:`flare_duallora.flare.run_files`).  A job started
again with ``resume = true`` and the same state name continues with the next round.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Optional

import numpy as np
import torch
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

from flare_duallora.engine import SHARED, SharingPolicy
from flare_duallora.engine.settings import int_setting_problem
from flare_duallora.flare.aggregator import SharedKeyAggregator
from flare_duallora.flare.filters import metrics_problem
from flare_duallora.flare.run_files import (
    CAUSE_HEADER, COMM_FILE, COMPLETED, FAILED, FEDEX_META, FINGERPRINT_META, GLOBAL_MODEL_FILE, PROGRESS_FILE,
    PRIVACY_META, PROGRESS_SNAPSHOT_FILE, RUN_STATUS_FILE, SERVER_STATE_FILE, SITE_RESULTS_FILE, append_jsonl,
    privacy_entry, read_jsonl, unflatten_metrics, write_json,
)
from flare_duallora.flare.site_policy import SitePolicy

COMM_FIELDS = {
    "round": "round index (0-based)",
    "bytes_received": "bytes of the shared tensors each site sent, as received by the server",
    "accepted": "weight share of each accepted contribution in the aggregate (sums to 1)",
    "rejected": "site -> why its contribution was rejected (the site counts as failed)",
    "clipped": "site -> {factor, reason}: the site's update was scaled by factor (clip_ratio x the other sites' "
               "median update norm, or max_update_norm x the global state's norm)",
    "capped": "site -> {factor, reason}: the site's weight share was multiplied by factor (a clipped site weighs "
              "the other sites' median declared weight; max_weight_ratio x that median; max_weight_share)",
    "declared": "the aggregation weight each site declared this round (dataset size, steps or 1), before any cap",
    "update_norm": "L2 norm of each site's update (its shared state minus the global state; in round 0 minus the "
                   "initial shared state the sites reported, else the coordinate-wise median of the contributions)",
    "reference_norm": "L2 norm of the reference global shared state the updates were measured against",
    "aggregated": "whether a new global model was made this round",
    "failed": "site -> cause, for sites that answered with an error or did not answer",
    "fedex_residual_bytes": "lora_aggregation = fedex: bytes of the dense residuals every site receives with the "
                            "next task, on top of the shared state",
}


def flat_schema(schema: dict, prefix: str = "") -> dict:
    """``{parameter name: shape}`` with the names whole again: ``nvflare job submit`` rewrites a job's configs through
    pyhocon, which turns the dotted key ``"vit.blocks.2.attn.qkv.lora_A.global.weight"`` into nested objects."""
    out = {}
    for key, value in schema.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_schema(value, name))
        else:
            out[name] = value
    return out


class PersonalisedFedAvg(BaseFedAvg):
    """Rounds of the shared-key aggregator, shared-only persistence, failure accounting, resume, final validation.

    Args:
        sharing: the sharing rule (``SharingPolicy.to_args()``), as on the sites.
        num_clients, num_rounds: sites per round and total rounds.
        aggregation: :class:`~flare_duallora.flare.aggregator.SharedKeyAggregator` settings (``weigh_by``,
            ``robust_aggregation``, ``max_update_norm``, ``max_weight_share``, ``reject_ratio``, ...).
        schema, fingerprint, reference_norm: what the job builder computed from the bundle (or None).
        max_failed_sites: how many sites may fail before the run fails (default 0).
        round_timeout: seconds to wait for a round's results (0: no limit).  With ``max_failed_sites`` > 0 the round
            ends ``straggler_wait`` seconds after all but ``max_failed_sites`` sites answered.
        state_name, resume: where the server's resumable state is kept, and whether to continue from it.
        validate_task: task sent to every site after the last round (``""`` to skip).
        initial_task: task sent to every site before round 0 of a fresh run (``""`` to skip): each site answers
            with its shared state before training, and the state a majority reports bit for bit (every site starts
            from the same seeded adapters) becomes the reference that round 0's updates are measured from (without
            it, the coordinate-wise median of the other sites' contributions).
    """

    def __init__(
        self,
        sharing: dict,
        num_clients: int = 2,
        num_rounds: int = 2,
        aggregation: Optional[dict] = None,
        schema: Optional[dict] = None,
        fingerprint: Optional[str] = None,
        reference_norm: Optional[float] = None,
        max_failed_sites: int = 0,
        round_timeout: int = 0,
        straggler_wait: int = 60,
        state_name: Optional[str] = None,
        resume: bool = False,
        validate_task: str = "validate",
        train_task: str = "train",
        initial_task: str = "submit_model",
    ):
        super().__init__(num_clients=num_clients, num_rounds=num_rounds, persistor_id="", ignore_result_error=True)
        problem = int_setting_problem("max_failed_sites", max_failed_sites, minimum=0)
        if problem:
            raise ValueError(problem)
        self.sharing = dict(sharing)
        self.aggregation = dict(aggregation or {})
        schema = flat_schema(schema) if isinstance(schema, dict) else schema
        self.schema = schema
        self.fingerprint = fingerprint
        self.reference_norm = reference_norm
        self.max_failed_sites = max_failed_sites
        self.round_timeout = round_timeout
        self.straggler_wait = straggler_wait
        self.state_name = state_name
        self.resume = resume
        self.validate_task = validate_task
        self.train_task = train_task
        self.initial_task = initial_task
        self.policy = SharingPolicy.from_args(self.sharing)
        self.aggregator = SharedKeyAggregator(
            self.sharing, schema=schema, fingerprint=fingerprint, reference_norm=reference_norm,
            min_agree=max(1, num_clients - max_failed_sites), **self.aggregation)
        self.failed_sites: dict[str, str] = {}
        self.site_results: dict = {}
        self._pending_residuals: dict = {}
        self._task_failures: dict[str, str] = {}
        self._completed = 0  # rounds completed (for the status file, whatever ends the run)
        self._started = time.time()

    # ------------------------------------------------------------------ files
    def _path(self, name: str) -> str:
        return os.path.join(self.get_run_dir(), name)

    def _state_path(self) -> str:
        local = self.engine.get_workspace().get_site_config_dir()
        key = self.state_name or self.fl_ctx.get_job_id()
        return str(SitePolicy.load(local).state_dir(local, "server", key) / SERVER_STATE_FILE)

    def _write_status(self, status: str, reason: str = "", rounds_completed: int = 0) -> None:
        write_json(self._path(RUN_STATUS_FILE), {
            "status": status, "reason": reason, "rounds_completed": rounds_completed, "num_rounds": self.num_rounds,
            "max_failed_sites": self.max_failed_sites, "failed_sites": self.failed_sites,
            "bounded": self._bound_summary(), "seconds": round(time.time() - self._started, 1)})

    def _bound_summary(self) -> dict:
        """How often the influence bounds acted: clips and caps per site, and the sites clipped in every round."""
        rounds = [h for h in self.aggregator.history if h.get("aggregated")]
        clipped = Counter(s for h in rounds for s in h.get("clipped") or {})
        capped = Counter(s for h in rounds for s in h.get("capped") or {})
        return {"rounds": len(rounds), "clipped": dict(sorted(clipped.items())),
                "capped": dict(sorted(capped.items())),
                "clipped_every_round": sorted(s for s, n in clipped.items() if rounds and n == len(rounds))}

    def _report_bounds(self) -> None:
        summary = self._bound_summary()
        for site in summary["clipped_every_round"]:
            self.warning(f"site {site} was clipped in every round ({summary['rounds']} of {summary['rounds']}): its "
                         f"updates were always far longer than the other sites' (communication.json says why)")
        if summary["clipped"] or summary["capped"]:
            self.info(f"influence bounds: clipped {summary['clipped'] or 'none'}, capped {summary['capped'] or 'none'}"
                      f" over {summary['rounds']} round(s)")

    def _write_comm(self) -> None:
        write_json(self._path(COMM_FILE), {"fields": COMM_FIELDS, "rounds": self.aggregator.history})

    # ------------------------------------------------------------------ failures
    def _accept_train_result(self, client_name, result, fl_ctx, is_unknown_task: bool = False) -> bool:
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK and not is_unknown_task:
            cause = result.get_header(CAUSE_HEADER)
            if not isinstance(cause, str) or not cause:
                cause = ("a task-result filter on the site blocked the result (the site's log says why)"
                         if rc == ReturnCode.TASK_RESULT_FILTER_ERROR else "no cause given")
            self._task_failures[client_name] = f"return code {rc}: {cause}"
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def _fail_sites(self, failures: dict[str, str], what: str) -> None:
        for site, cause in sorted(failures.items()):
            self.error(f"site {site} failed ({what}): {cause}")
            self.failed_sites.setdefault(site, f"{what}: {cause}")

    def _too_many_failed(self) -> bool:
        return len(self.failed_sites) > self.max_failed_sites

    def _fail_run(self, reason: str, rounds_completed: int) -> None:
        lines = [f"  {site}: {cause}" for site, cause in sorted(self.failed_sites.items())]
        self.error(f"the run failed: {reason}\n" + "\n".join(lines))
        self._write_status(FAILED, reason, rounds_completed)
        self.panic(f"flare_duallora run failed: {reason}")

    def _send(self, task: str, model: FLModel, clients: list[str]) -> tuple[list[FLModel], dict[str, str]]:
        """Send a task, wait, and return the good results and ``{site: cause}`` for every site without one."""
        self._task_failures = {}
        tolerate = min(self.max_failed_sites, max(0, len(clients) - 1))
        min_responses = len(clients) - tolerate if tolerate else None
        if min_responses is not None:
            results = self.broadcast_model(task_name=task, data=model, targets=clients, min_responses=min_responses,
                                           timeout=self.round_timeout, wait_time_after_min_received=self.straggler_wait)
        else:
            results = self.send_model_and_wait(task_name=task, data=model, targets=clients,
                                               timeout=self.round_timeout)
        failures = dict(self._task_failures)
        answered = {(r.meta or {}).get("client_name") for r in results} | set(failures)
        for site in clients:
            if site not in answered:
                failures[site] = "no result (the site did not answer in time or its task was cancelled)"
        return results, failures

    # ------------------------------------------------------------------ persistence
    def save_model(self, model: FLModel) -> None:
        params = model.params or {}
        bad = [k for k, r in self.policy.roles(params).items() if r != SHARED]
        if bad:  # the aggregator refuses these; this guards the file itself
            raise RuntimeError(f"refusing to persist a global model with non-shared keys: {sorted(bad)[:5]}")
        torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}, self._path(GLOBAL_MODEL_FILE))

    def _save_server_state(self, params: dict, round_completed: int, residuals: Optional[dict] = None) -> None:
        from flare_duallora.training.site_state import save_state_file

        save_state_file(self._state_path(), {
            "global": {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()},
            "round_completed": round_completed, "num_rounds": self.num_rounds,
            "fingerprint": self.aggregator._fingerprint, "sharing": self.sharing,
            "fedex_residuals": {k: torch.as_tensor(np.asarray(v)) for k, v in (residuals or {}).items()},
            "declared_weights": {s: [float(w), int(r)] for s, (w, r) in self.aggregator.declared.items()}})

    def _load_server_state(self) -> tuple[dict, int]:
        from flare_duallora.training.site_state import load_state_file

        path = self._state_path()
        if not os.path.isfile(path):
            self.warning(f"resume = true but there is no server state at {path}: starting at round 0")
            return {}, 0
        state = load_state_file(path, required="global")
        if state.get("sharing") and state["sharing"] != self.sharing:
            raise RuntimeError(f"{path} was saved for the sharing rule {state['sharing']}, not {self.sharing}; "
                               f"use another state name for another method")
        params = {k: v.numpy() for k, v in state["global"].items()}
        self._pending_residuals = {k: v.numpy() for k, v in (state.get("fedex_residuals") or {}).items()}
        if state.get("fingerprint"):
            self.aggregator._fingerprint = state["fingerprint"]  # with fedex it moved with every round
        # each site's first declared weight stays fixed across a restart
        self.aggregator.declared = {str(s): [float(w), int(r)] for s, (w, r) in
                                    (state.get("declared_weights") or {}).items()}
        start = int(state["round_completed"]) + 1
        self.info(f"resuming from {path}: round {start} with the global model of round {start - 1} "
                  f"({len(params)} shared keys)")
        return params, start

    # ------------------------------------------------------------------ workflow
    def run(self) -> None:
        self._write_status("running")
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - the status file must say how the run ended, whatever ended it
            reason = f"the server workflow failed: {type(e).__name__}: {str(e)[:500]}"
            self.error(reason + "\n" + "\n".join(f"  {s}: {c}" for s, c in sorted(self.failed_sites.items())))
            self._write_status(FAILED, reason, self._completed)
            raise

    def _run(self) -> None:
        self.aggregator.fl_ctx = self.fl_ctx  # not a registered component: it gets no START_RUN event
        clients = self.sample_clients(self.num_clients)
        params, start = self._load_server_state() if self.resume else ({}, 0)
        completed = self._completed = start
        residuals = self._pending_residuals  # fedex: folded by every site with the next task
        if start == 0 and not params and self.initial_task:
            self._initial_reference(clients)
        for rnd in range(start, self.num_rounds):
            if self.abort_signal.triggered:
                return
            self.info(f"round {rnd} of {self.num_rounds} started ({len(clients)} sites)")
            self.aggregator.reset_stats()
            self.aggregator.set_global(params, rnd)
            model = FLModel(params_type=ParamsType.FULL, params=params, current_round=rnd, total_rounds=self.num_rounds,
                            start_round=start, meta={FEDEX_META: residuals} if residuals else {})
            results, failures = self._send(self.train_task, model, clients)
            self._fail_sites(failures, f"round {rnd}")
            losses, epsilon = [], {}
            for result in sorted(results, key=lambda r: str((r.meta or {}).get("client_name"))):
                privacy = privacy_entry((result.meta or {}).get(PRIVACY_META))
                if privacy:
                    epsilon[str((result.meta or {}).get("client_name"))] = privacy["epsilon"]
                if self.aggregator.accept_model(result):
                    loss = (result.meta or {}).get("loss")
                    if isinstance(loss, (int, float)) and np.isfinite(loss):
                        losses.append(float(loss))
            aggregated = self.aggregator.aggregate_model()
            summary = aggregated.meta["aggregation"]
            summary["failed"] = failures
            self._fail_sites(summary.get("rejected", {}), f"round {rnd}, contribution rejected")
            self._write_comm()
            append_jsonl(self._path(PROGRESS_FILE), {
                "round": rnd, "num_rounds": self.num_rounds, "answered": sorted(summary.get("bytes_received", {})),
                "accepted": sorted(summary.get("accepted", {})), "failed": sorted(set(failures) |
                                                                                  set(summary.get("rejected", {}))),
                "clipped": sorted(summary.get("clipped") or {}), "capped": sorted(summary.get("capped") or {}),
                "mean_loss": float(np.mean(losses)) if losses else None,
                "bytes_received": sum(v for v in summary.get("bytes_received", {}).values() if isinstance(v, int)),
                "seconds": round(time.time() - self._started, 1), **({"epsilon": epsilon} if epsilon else {})})
            write_json(self._path(PROGRESS_SNAPSHOT_FILE), read_jsonl(self._path(PROGRESS_FILE)))
            if epsilon:
                self.info(f"round {rnd}: epsilon spent per site " +
                          ", ".join(f"{k} {v:.3g}" for k, v in sorted(epsilon.items())))
            if self._too_many_failed():
                self._fail_run(f"{len(self.failed_sites)} site(s) failed, more than max_failed_sites = "
                               f"{self.max_failed_sites}", completed)
                return
            if not summary.get("aggregated"):
                self._fail_run(f"round {rnd}: no contribution could be aggregated", completed)
                return
            params = aggregated.params
            residuals = aggregated.meta.get(FEDEX_META) or {}
            self.save_model(aggregated)
            self._save_server_state(params, rnd, residuals)
            completed = self._completed = rnd + 1
        self._report_bounds()
        self._validate(params, completed, residuals)

    def _initial_reference(self, clients: list[str]) -> None:
        """Ask every site for its shared state before round 0; the aggregator keeps the one a majority holds."""
        results, failures = self._send(self.initial_task, FLModel(params_type=ParamsType.FULL, params={}), clients)
        self._task_failures = {}  # a site that cannot answer this fails in round 0, with its cause
        message = self.aggregator.learn_initial(results, len(clients))
        (self.info if self.aggregator.initial is not None else self.warning)(
            message + (f" (no answer from {sorted(failures)})" if failures else ""))

    def _validate(self, params: dict, completed: int, residuals: Optional[dict] = None) -> None:
        if self.validate_task and not self.abort_signal.triggered:
            clients = self.sample_clients(self.num_clients)
            self.info("final validation of personalised and global-only models on every site")
            results, failures = self._send(self.validate_task, FLModel(
                params_type=ParamsType.FULL, params=params, meta={FEDEX_META: residuals} if residuals else {}), clients)
            for result in results:
                meta = result.meta if isinstance(result.meta, dict) else {}
                site = str(meta.get("client_name", "unknown"))
                fp = meta.get(FINGERPRINT_META)
                expected = self.aggregator._fingerprint
                if expected is not None and fp != expected:
                    failures[site] = f"base fingerprint {str(fp)[:80]} differs from the job's {expected}"
                    continue
                problem = metrics_problem(result.metrics if result.metrics is not None else {})
                if problem:  # a hostile result is a rejection, never a crash of the results writer
                    failures[site] = f"malformed validation metrics rejected: {problem}"
                    continue
                self.site_results[site] = unflatten_metrics(result.metrics or {})
                privacy = privacy_entry((result.meta or {}).get(PRIVACY_META))
                if privacy:
                    self.site_results[site]["privacy"] = privacy
            for site, cause in failures.items():
                self.site_results[site] = {"error": cause}
            self._fail_sites(failures, "final validation")
            write_json(self._path(SITE_RESULTS_FILE), self.site_results)
            self.info(f"per-site results written to {self._path(SITE_RESULTS_FILE)} "
                      f"({len(self.site_results) - len(failures)} of {len(clients)} sites validated"
                      + (f"; missing: {sorted(failures)}" if failures else "") + ")")
            if self._too_many_failed():
                self._fail_run(f"{len(self.failed_sites)} site(s) failed, more than max_failed_sites = "
                               f"{self.max_failed_sites}", completed)
                return
        self._write_status(COMPLETED, "", completed)
