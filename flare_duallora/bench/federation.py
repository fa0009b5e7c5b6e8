"""A federation in one process, for benchmarks: the recipe's own executor, filter and aggregator classes, driven in
the order the FLARE controller drives them, without the simulator's start-up cost (~15 s per run on 2 cores).

Each site is a real :class:`~flare_duallora.flare.executor.DualLoRAExecutor` with its own FLARE workspace folder,
its result goes through the real :class:`~flare_duallora.flare.filters.PrivateKeyFilter` and the real
:class:`~flare_duallora.flare.aggregator.SharedKeyAggregator`, with shareables converted by nvflare's own
``FLModelUtils`` exactly as on the wire.  Sites are summed in a fixed (sorted) order, as the controller does, so the
global model matches an ``nvflare simulator`` run of the same job (``tests/test_federation.py`` checks it to 1e-6).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from flare_duallora.deploy.recipe import DualLoRARecipe
from flare_duallora.deploy.site_config import install_site_config, job_site_policy
from flare_duallora.flare.aggregator import SharedKeyAggregator
from flare_duallora.flare.run_files import CAUSE_HEADER, FEDEX_META, unflatten_metrics

JOB_ID = "in_process_job"


class _Engine:
    """What a site's components ask FLARE's engine for: the workspace, and somewhere to fire (log) events."""

    def __init__(self, workspace: Workspace):
        self._workspace = workspace

    def get_workspace(self) -> Workspace:
        return self._workspace

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """No other component listens in one process (FLARE forwards error-log events to log streamers)."""


def _context(site: str, root: Path) -> FLContext:
    (root / "local").mkdir(parents=True, exist_ok=True)
    (root / JOB_ID).mkdir(parents=True, exist_ok=True)
    (root / "startup").mkdir(parents=True, exist_ok=True)  # a FLARE workspace has one
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    ctx.set_prop(ReservedKey.RUN_NUM, JOB_ID, private=False, sticky=True)
    ctx.set_prop(ReservedKey.ENGINE, _Engine(Workspace(str(root), site)), private=True, sticky=True)
    ctx.set_prop(FLContextKey.JOB_META, {"name": JOB_ID}, private=True, sticky=True)
    return ctx


@dataclass
class FederationResult:
    """What an in-process run produced (the same records a simulator run leaves, in memory)."""

    site_results: dict = field(default_factory=dict)  # final validation, per site
    rounds: list = field(default_factory=list)  # the aggregator's per-round summaries
    records: dict = field(default_factory=dict)  # per site: the executor's round records
    globals: list = field(default_factory=list)  # the global shared state after each round
    received: list = field(default_factory=list)  # every result as the server got it: site, task, round, keys
    sites: dict = field(default_factory=dict, repr=False)  # site -> its SiteBuild (the trained models, in memory)
    failures: dict = field(default_factory=dict)  # site -> cause

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.site_results)


def run_in_process(recipe: DualLoRARecipe, workdir: str | os.PathLike,
                   log: Optional[Callable[[str], None]] = None,
                   on_round: Optional[Callable[[int, str, dict, object], None]] = None) -> FederationResult:
    """Run ``recipe`` with its own components in this process (site workspaces under ``workdir``).

    ``on_round(round, site, metrics, site_build)``, when given, is called for every site after every round with the
    site's validation metrics of the model it holds once that round's global model is in (personalised and
    global-only, from the recipe's own ``validate`` task: the site's validation split only) and its
    :class:`~flare_duallora.training.from_bundle.SiteBuild` (to keep a copy of the weights); after the last round
    that is the final validation.  Validating between rounds changes nothing the next round trains (the next train
    task loads the same global model).  Runs whose global model carries fedex residuals (folded into the frozen base
    on receipt) are only validated at the end: folding them twice would change the base.
    """
    from flare_duallora.flare.run_files import PRIVACY_META, SITE_RECORDS_FILE, privacy_entry, read_jsonl

    work = Path(workdir).resolve()
    recipe._validate_before_use()
    recipe._ensure_client_apps_prepared()
    sites = sorted(recipe.clients)
    per_site = recipe.per_site_config or {}
    executors, contexts = {}, {}
    policy = job_site_policy(*recipe.site_paths())  # whoever runs this federation runs every site
    for site in sites:
        install_site_config(work / site / "local", site_policy=policy)
        entry = per_site.get(site, {})
        datalist = entry.get("datalist")
        executor = recipe._executor(entry.get("bundle_root") or recipe.plan.bundle_root,
                                    None if datalist else recipe.plan.datalist_dir, datalist)
        executor.state_dir = str(work / site / "state")
        ctx = _context(site, work / site)
        executor.handle_event(EventType.START_RUN, ctx)
        executors[site], contexts[site] = executor, ctx
    flt = recipe._filter()
    controller = recipe.controller
    aggregator = SharedKeyAggregator(controller.sharing, schema=controller.schema, fingerprint=controller.fingerprint,
                                     reference_norm=controller.reference_norm,
                                     min_agree=controller.aggregator.min_agree,
                                     **controller.aggregation)
    residuals: dict = {}
    out = FederationResult()
    params: dict = {}
    if controller.initial_task:  # as the controller: the sites' shared state before round 0
        empty = FLModel(params_type=ParamsType.FULL, params={})
        initial = [_send(executors[s], contexts[s], flt, controller.initial_task, empty, out) for s in sites]
        aggregator.learn_initial([r for r in initial if r is not None], len(sites))
    fedex = False
    for rnd in range(controller.num_rounds):
        aggregator.reset_stats()
        aggregator.set_global(params, rnd)
        model = FLModel(params_type=ParamsType.FULL, params=params, current_round=rnd,
                        total_rounds=controller.num_rounds, start_round=0,
                        meta={FEDEX_META: residuals} if residuals else {})
        for site in sites:
            reply = _send(executors[site], contexts[site], flt, controller.train_task, model, out)
            if reply is not None:
                aggregator.accept_model(reply)
        aggregated = aggregator.aggregate_model()
        summary = aggregated.meta["aggregation"]
        for site, reason in summary.get("rejected", {}).items():
            out.failures.setdefault(site, f"round {rnd}, contribution rejected: {reason}")
        out.rounds.append(summary)
        if not summary.get("aggregated"):
            break
        params = aggregated.params
        residuals = aggregated.meta.get(FEDEX_META) or {}
        out.globals.append(params)
        if on_round is not None and rnd < controller.num_rounds - 1:
            fedex = fedex or bool(residuals)
            if not fedex:
                between = FLModel(params_type=ParamsType.FULL, params=params, current_round=rnd)
                for site in sites:
                    reply = _send(executors[site], contexts[site], flt, controller.validate_task, between, out)
                    if reply is not None:
                        on_round(rnd, site, unflatten_metrics(reply.metrics or {}), executors[site].site)
        if log:
            log(f"round {rnd + 1}/{controller.num_rounds}: accepted {sorted(summary.get('accepted', {}))}")
    final = FLModel(params_type=ParamsType.FULL, params=params, meta={FEDEX_META: residuals} if residuals else {})
    for site in sites:
        reply = _send(executors[site], contexts[site], flt, controller.validate_task, final, out)
        if reply is not None:
            out.site_results[site] = unflatten_metrics(reply.metrics or {})
            privacy = privacy_entry((reply.meta or {}).get(PRIVACY_META))
            if privacy:  # as the server keeps it
                out.site_results[site]["privacy"] = privacy
            if on_round is not None:
                on_round(len(out.rounds) - 1, site, out.site_results[site], executors[site].site)
        out.records[site] = read_jsonl(work / site / JOB_ID / SITE_RECORDS_FILE)
    for site in sites:
        executors[site].handle_event(EventType.END_RUN, contexts[site])
        if executors[site].site is not None:
            out.sites[site] = executors[site].site
    return out


def _send(executor, ctx, flt, task: str, model: FLModel, out: FederationResult) -> Optional[FLModel]:
    site = ctx.get_identity_name()
    shareable = FLModelUtils.to_shareable(model)
    shareable.set_header(AppConstants.CURRENT_ROUND, model.current_round)
    reply = executor.execute(task, shareable, ctx, Signal())
    reply = flt.process(reply, ctx)
    rc = reply.get_return_code(ReturnCode.OK)
    if rc != ReturnCode.OK:
        out.failures.setdefault(site, f"{task}: return code {rc}: {reply.get_header(CAUSE_HEADER)}")
        return None
    result = FLModelUtils.from_shareable(reply)
    result.meta = {**(result.meta or {}), "client_name": site}
    out.received.append({"site": site, "task": task, "round": model.current_round,
                         "keys": sorted(result.params or {})})
    return result
