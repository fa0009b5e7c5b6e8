"""``DualLoRARecipe``: a personalised federated fine-tuning job as an nvflare Job Recipe.

The recipe is *what* the federation is (bundle, method settings, rounds, integrity rules); the environment is
*where* it runs (``SimEnv`` / :class:`~flare_duallora.deploy.simulate.DualLoRASimEnv`, ``PocEnv``, ``ProdEnv``)::

    from nvflare.recipe import ProdEnv
    from flare_duallora import DualLoRARecipe
    from flare_duallora.deploy.simulate import DualLoRASimEnv

    recipe = DualLoRARecipe(
        name="cmr_duallora", target="sim", bundle_root="my_bundle", datalist_dir="data/sites",
        clients=["site-siemens", "site-philips", "site-ge", "site-canon"],
        settings={"method": "duallora", "blocks": "last:2", "rank": 8, "head": "vit.classification_head"},
        num_rounds=5, local_epochs=2)
    run = recipe.run(DualLoRASimEnv(clients=recipe.clients, workspace_root="ws"))   # or recipe.export("jobs")

Every setting is checked when the recipe is built (:func:`~flare_duallora.deploy.preflight.check_job`): all
problems at once, in :class:`~flare_duallora.deploy.preflight.JobCheckError`.  Paths are resolved where the recipe
is built for ``target`` ``sim`` and ``poc``; a ``prod`` recipe refuses relative site paths.  Per-site bundles and
datalists go through the Recipe's own hook, right after construction::

    recipe.set_per_site_config({"site-a": {"datalist": "/data/a.json"}, "site-b": {"bundle_root": "/b/bundle"}})
    recipe.set_per_site_config({"site-a": {"bundle_overrides": {"dataset_dir": "/data/a"}}})  # plain values only

Note: nvflare's ``nvflare.recipe.spec`` removes ``--export`` / ``--export-dir`` from ``sys.argv`` when imported and
``Recipe.execute()`` exits the process when exporting; the package therefore imports this module lazily, and its
own commands call :meth:`run` / :meth:`export`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.recipe.spec import ExecEnv, Recipe

from flare_duallora.deploy.preflight import JobCheckError, JobPlan, check_job
from flare_duallora.engine import AdapterSettings, SharingPolicy
from flare_duallora.engine.aggregation import DEFAULT_CLIP_RATIO, DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_MAX_WEIGHT_SHARE
from flare_duallora.flare.audit import ReceivedKeysAudit
from flare_duallora.flare.controller import PersonalisedFedAvg
from flare_duallora.flare.executor import DualLoRAExecutor
from flare_duallora.flare.filters import PrivateKeyFilter

TASKS = ["train", "validate", "submit_model"]
PACKAGE = "flare_duallora"


class DualLoRARecipe(Recipe):
    """A personalised federated LoRA job (Med-DualLoRA, FedOPAL, pFedST and the baselines) on a MONAI bundle.

    Args (keyword-only):
        name: the job's name (also the default ``state_name``).
        target: where the job will run: ``sim`` (simulator), ``poc`` (a POC on this machine) or ``prod``.
        bundle_root: the MONAI bundle every site fine-tunes (a folder, or ``pkg://<package>/<folder>``).
        settings: the method settings, an :class:`~flare_duallora.engine.AdapterSettings` or its dict
            (``method``, ``target_modules``, ``blocks``, ``rank``, ``head``, ``seed``, ...), validated once.
        clients: the site names (default: the datalist folder's ``clients.json``); ``min_clients`` defaults to all.
        datalist_dir: the folder holding ``<site>.json`` (per-site files: :meth:`set_per_site_config`).
        num_rounds, local_epochs, local_steps: the work per job and per round.
        bundle_overrides: plain bundle config overrides (``{"image_size": [32, 32, 8]}``); per site on top of these:
            ``set_per_site_config({"site-a": {"bundle_overrides": {"dataset_dir": "/data/a"}}})``.
        task: ``auto`` (read from the bundle: metadata, ``validate#key_metric``, output shape), ``classification``
            or ``segmentation``.
        bundle_ids: the bundle's own names of the model-zoo ids it defines otherwise (``{"train#dataset":
            "train_dataset", "validate#dataset": "val_dataset", "loss": "lossfn"}``).
        weigh_by: ``dataset_size`` (default) | ``steps`` | ``uniform``.
        robust_aggregation, clip_ratio, max_weight_ratio, max_weight_share, max_update_norm, reject_ratio: bounded
            influence of each site (see :mod:`flare_duallora.engine.aggregation`).  On by default: an update longer
            than ``clip_ratio`` (6) x the other sites' median update norm is clipped, and its weight cut to the
            others' median; a declared weight above ``max_weight_ratio`` (8) x the others' median, or a share above
            ``max_weight_share`` (0.6), is capped.  Measured honest federations never reach them, so they are
            aggregated exactly as plain FedAvg.  ``None`` turns one off.
        lora_aggregation: ``factors`` (average A and B; FedAvg), ``svd`` (average the products B A, refactor to rank
            r) or ``fedex`` (factors plus the exact average's residual folded into every site's base each round).
        max_failed_sites: how many sites may fail (start-up, a round, a rejected contribution) before the job
            fails (default 0).  ``round_timeout``: seconds a round may take (0: no limit).
        state_name, resume, on_state_mismatch: resumable private and server state (see the executor).
        allow_random_base: accept a bundle without ``models/model.pt`` (every site builds the same seeded base).
        prefix_cache: ``auto`` | ``on`` | ``off`` (the frozen-prefix cache of the sites).
        device, seed, export_bundles, on_private, audit: as on the components.
        scope: the privacy scope the job asks the sites for (job meta ``scope``).
        differential_privacy: ``{"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0}`` (optional ``accountant``
            ``rdp`` | ``prv``, ``unit`` ``auto`` | ``item`` | ``subject``): every site trains with DP-SGD under this
            budget for the whole job (:mod:`flare_duallora.training.privacy`); the recipe adds ``rounds``.
    """

    def __init__(
        self,
        *,
        name: str,
        target: str,
        bundle_root: str,
        settings: Any,
        clients: Optional[Sequence[str]] = None,
        min_clients: Optional[int] = None,
        datalist_dir: Optional[str] = None,
        num_rounds: int = 5,
        local_epochs: int = 1,
        local_steps: Optional[int] = None,
        bundle_overrides: Optional[Mapping] = None,
        weigh_by: str = "dataset_size",
        robust_aggregation: str = "mean",
        max_update_norm: Optional[float] = None,
        max_weight_share: Optional[float] = DEFAULT_MAX_WEIGHT_SHARE,
        reject_ratio: Optional[float] = 100.0,
        clip_ratio: Optional[float] = DEFAULT_CLIP_RATIO,
        max_weight_ratio: Optional[float] = DEFAULT_MAX_WEIGHT_RATIO,
        lora_aggregation: str = "factors",
        max_failed_sites: int = 0,
        round_timeout: int = 0,
        state_name: Optional[str] = None,
        resume: bool = False,
        on_state_mismatch: str = "refuse",
        allow_random_base: bool = False,
        prefix_cache: str = "auto",
        device: str = "auto",
        seed: int = 0,
        export_bundles: bool = True,
        task: str = "auto",
        bundle_ids: Optional[Mapping] = None,
        on_private: str = "strip",
        audit: bool = True,
        scope: Optional[str] = None,
        differential_privacy: Optional[Mapping] = None,
    ):
        from flare_duallora.flare.site_policy import SitePolicyError, check_simple_name

        try:  # sites refuse other names (they name the state folder): say so where the job is built
            check_simple_name(name, "name")
            if state_name is not None:
                check_simple_name(state_name, "state_name")
        except SitePolicyError as e:
            raise JobCheckError([str(e)]) from None
        self.target = target
        self.settings = settings if isinstance(settings, AdapterSettings) else None
        self.bundle_overrides = dict(bundle_overrides or {})
        self.plan: JobPlan = check_job(
            target=target, settings=settings, bundle_root=bundle_root, sites=clients, datalist_dir=datalist_dir,
            bundle_overrides=self.bundle_overrides, allow_random_base=allow_random_base, num_rounds=num_rounds,
            local_epochs=local_epochs, local_steps=local_steps, min_clients=min_clients,
            max_failed_sites=max_failed_sites, task=task, bundle_ids=bundle_ids,
            differential_privacy=differential_privacy)
        self.settings = settings if isinstance(settings, AdapterSettings) else AdapterSettings.from_dict(dict(settings))
        self.sharing = SharingPolicy(self.settings.method, self.settings.heads, self.settings.head_shared).to_args()
        self.clients = list(self.plan.sites)
        self.min_clients = min_clients or len(self.clients) or None
        if self.min_clients is None:
            raise JobCheckError(["name the sites ('clients') or set 'min_clients'"])
        self.local = dict(
            local_epochs=local_epochs, local_steps=local_steps, state_name=state_name or name, resume=resume,
            on_state_mismatch=on_state_mismatch, allow_random_base=allow_random_base, prefix_cache=prefix_cache,
            device=device, seed=seed, export_bundles=export_bundles, lora_aggregation=lora_aggregation, task=task,
            bundle_ids=dict(bundle_ids) if bundle_ids else None,
            differential_privacy={"rounds": num_rounds, **dict(differential_privacy)} if differential_privacy else None)
        self.on_private = on_private
        self.per_site_config: Optional[Dict[str, Dict]] = None
        aggregation = dict(weigh_by=weigh_by, robust_aggregation=robust_aggregation, max_update_norm=max_update_norm,
                           max_weight_share=max_weight_share, reject_ratio=reject_ratio,
                           lora_aggregation=lora_aggregation, clip_ratio=clip_ratio,
                           max_weight_ratio=max_weight_ratio)
        if lora_aggregation != "factors":
            aggregation["lora_scaling"] = self.settings.alpha_of("global") / self.settings.rank_of("global")
        try:
            self.controller = PersonalisedFedAvg(
                self.sharing, num_clients=self.min_clients, num_rounds=num_rounds, aggregation=aggregation,
                schema=self.plan.schema, fingerprint=self.plan.fingerprint, reference_norm=self.plan.reference_norm,
                max_failed_sites=max_failed_sites, round_timeout=round_timeout, state_name=state_name or name,
                resume=resume)
            self._executor(self.plan.bundle_root, self.plan.datalist_dir, None)  # validates the site settings
        except ValueError as e:
            raise JobCheckError([str(e)]) from None
        job = FedJob(name=name, min_clients=self.min_clients, meta_props={"scope": scope} if scope else None)
        job.set_app_packages([PACKAGE])  # sites import the installed package: no BYOC custom code
        job.to_server(self.controller)
        if audit:
            job.to_server(ReceivedKeysAudit(), tasks=list(TASKS), filter_type=FilterType.TASK_RESULT)
        super().__init__(job)

    # ------------------------------------------------------------------ components
    def _executor(self, bundle_root: str, datalist_dir: Optional[str], datalist: Optional[str],
                  overrides: Optional[Mapping] = None) -> DualLoRAExecutor:
        return DualLoRAExecutor(bundle_root=bundle_root, settings=self.settings.to_dict(), datalist_dir=datalist_dir,
                                datalist=datalist, bundle_overrides={**self.bundle_overrides, **dict(overrides or {})},
                                **self.local)

    def _filter(self) -> PrivateKeyFilter:
        return PrivateKeyFilter(self.sharing, on_private=self.on_private)

    def _apply_per_site_config(self, config: Dict[str, Dict]) -> None:
        unknown = [s for s in config if self.clients and s not in self.clients]
        if unknown:
            raise JobCheckError([f"per-site config names site(s) {unknown} that are not among the clients "
                                 f"{self.clients}"])
        merged = {**self.plan.per_site, **config}
        self.plan = check_job(
            target=self.target, settings=self.settings, bundle_root=self.plan.bundle_root, sites=self.clients,
            datalist_dir=self.plan.datalist_dir, per_site=merged, bundle_overrides=self.bundle_overrides,
            allow_random_base=self.local["allow_random_base"], num_rounds=self.controller.num_rounds,
            local_epochs=self.local["local_epochs"], local_steps=self.local["local_steps"],
            max_failed_sites=self.controller.max_failed_sites, task=self.local["task"],
            bundle_ids=self.local["bundle_ids"], differential_privacy=self.local["differential_privacy"])
        self.per_site_config = self.plan.per_site
        for attr in ("schema", "fingerprint", "reference_norm"):
            setattr(self.controller, attr, getattr(self.plan, attr))

    def _prepare_client_apps(self) -> None:
        if not self.per_site_config:
            self._job.to_clients(self._executor(self.plan.bundle_root, self.plan.datalist_dir, None), tasks=TASKS)
            self._job.to_clients(self._filter(), tasks=list(TASKS), filter_type=FilterType.TASK_RESULT)
            return
        for site in self.clients:
            entry = self.per_site_config.get(site, {})
            datalist = entry.get("datalist")
            executor = self._executor(entry.get("bundle_root") or self.plan.bundle_root,
                                      None if datalist else self.plan.datalist_dir, datalist,
                                      entry.get("bundle_overrides"))
            self._job.to(executor, site, tasks=TASKS)
            self._job.to(self._filter(), site, tasks=list(TASKS), filter_type=FilterType.TASK_RESULT)

    # ------------------------------------------------------------------ environments
    def site_paths(self) -> tuple[list, list]:
        """``(bundles, data)``: every bundle and datalist path the job's sites get (for the site policy the
        simulator and POC helpers write, where whoever builds the recipe also runs the sites)."""
        bundles, data = [self.plan.bundle_root], [self.plan.datalist_dir]
        for entry in (self.plan.per_site or {}).values():
            bundles.append(entry.get("bundle_root"))
            data.append(entry.get("datalist"))
        return [b for b in bundles if b], [d for d in data if d]

    def process_env(self, env: ExecEnv) -> None:
        """Install the plugin's site configuration where the environment needs it before the job runs: a
        simulator workspace gets ``local/resources.json`` (allow-list), ``privacy.json`` and the site policy
        allowing the bundles and data this recipe names (``SimEnv`` only writes nvflare's default allow-list when
        none exists); a :class:`~flare_duallora.deploy.poc.LoopbackPocEnv` provisions its kits with that policy."""
        from nvflare.recipe import ProdEnv, SimEnv

        from flare_duallora.deploy.poc import LoopbackPocEnv
        from flare_duallora.deploy.simulate import install_simulator_config
        from flare_duallora.deploy.site_config import privacy_config

        if isinstance(env, SimEnv):
            import os

            install_simulator_config(os.path.join(env.workspace_root, self.name),
                                     privacy_config(self.sharing, self.on_private), *self.site_paths())
        elif isinstance(env, LoopbackPocEnv):
            env.allow_job_paths(*self.site_paths())
        elif isinstance(env, ProdEnv) and self.target == "sim":
            raise JobCheckError([f"recipe {self.name!r} was built for target 'sim': its paths were resolved on this "
                                 f"machine; build it with target='prod' (absolute site paths) to submit it"])
