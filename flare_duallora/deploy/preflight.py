"""Checks before a job ships: everything the building machine can know, reported at once.

Every job builder (the recipe, the CLI ``job`` command, template creation) calls :func:`check_job` first.  It
finds, in one pass, what would otherwise surface on the sites after the job started (about 40 s each, in a site's
``error_log.txt``): a missing or broken bundle, ``target_modules`` / ``blocks`` / ``head`` that do not fit the
network, bad method settings, missing site datalists, a bundle without pretrained weights, relative site paths in a
production job.  Problems come back as one line each in :class:`JobCheckError`.

When the bundle is available here (always for ``sim`` and ``poc``), the check also computes what the server
should know before round 0 (:class:`JobPlan`): the shared schema (keys and shapes), the base fingerprint and the
norm of the initial shared state.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from flare_duallora.bundle.paths import PKG_SCHEME, code_in_overrides, is_site_absolute, resolve_bundle_path

TARGETS = ("sim", "poc", "prod")
LOCAL_TARGETS = ("sim", "poc")


class JobCheckError(ValueError):
    """Everything wrong with a job, one problem per line (``problems``)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class JobPlan:
    """What the checks learned: resolved paths and, when the bundle was available, the server's schema."""

    target: str
    bundle_root: str
    datalist_dir: Optional[str]
    sites: list[str]
    per_site: dict = field(default_factory=dict)  # site -> {"bundle_root": ..., "datalist": ...} (resolved)
    schema: Optional[dict] = None  # shared key -> shape
    fingerprint: Optional[str] = None
    reference_norm: Optional[float] = None
    base_source: Optional[str] = None
    task: Optional[str] = None  # classification | segmentation, as the sites will evaluate
    notes: list[str] = field(default_factory=list)


def _site_path(value: Optional[str], setting: str, target: str, problems: list, base: Path) -> Optional[str]:
    """Resolve a site path for ``target``: relative paths are made absolute where the job is built (sim, poc) and
    refused for production."""
    if value is None or value == "":
        return value
    text = os.fspath(value)
    if is_site_absolute(text):
        return text if text.startswith((PKG_SCHEME, "{")) else os.path.expanduser(os.path.expandvars(text))
    if target == "prod":
        problems.append(f"setting {setting!r} = {text!r} is a relative path: for a production job site paths must be "
                        f"absolute on the site, or pkg://<package>/<folder> for a folder of an installed package")
        return text
    return str((base / text).resolve())


def _datalist_of(site: str, datalist_dir: Optional[str], per_site: Mapping) -> Optional[str]:
    entry = per_site.get(site, {})
    if entry.get("datalist"):
        return entry["datalist"]
    if datalist_dir and not datalist_dir.startswith("{"):
        return str(Path(datalist_dir) / f"{site}.json")
    return None


def sites_of_datalist_dir(datalist_dir: Optional[str]) -> list[str]:
    """The site names a datalist folder's ``clients.json`` lists (written by ``flare-duallora split``)."""
    if not datalist_dir:
        return []
    path = Path(datalist_dir) / "clients.json"
    if not path.is_file():
        return []
    try:
        return [c["name"] for c in json.loads(path.read_text())["clients"]]
    except (ValueError, KeyError, TypeError):
        return []


def check_job(
    *,
    target: str,
    settings: Any,
    bundle_root: str,
    sites: Optional[Sequence[str]] = None,
    datalist_dir: Optional[str] = None,
    per_site: Optional[Mapping[str, Mapping]] = None,
    bundle_overrides: Optional[Mapping] = None,
    allow_random_base: bool = False,
    state_dir: Optional[str] = None,
    num_rounds: int = 1,
    local_epochs: int = 1,
    local_steps: Optional[int] = None,
    min_clients: Optional[int] = None,
    max_failed_sites: int = 0,
    differential_privacy: Optional[Mapping] = None,
    base: Optional[str | os.PathLike] = None,
    task: str = "auto",
    bundle_ids: Optional[Mapping[str, str]] = None,
) -> JobPlan:
    """Check a job's settings where it is built; raise :class:`JobCheckError` listing every problem.

    ``base`` is the folder relative paths are resolved against (default: the current working folder).
    """
    from flare_duallora.engine import AdapterSettings
    from flare_duallora.engine.settings import int_setting_problem

    problems: list[str] = []
    base = Path(base) if base is not None else Path.cwd()
    if target not in TARGETS:
        raise JobCheckError([f"setting 'target' = {target!r}: expected one of {TARGETS} (where the job will run: the "
                             f"simulator, a POC on this machine, or a production deployment)"])
    try:
        settings = settings if isinstance(settings, AdapterSettings) else AdapterSettings.from_dict(dict(settings))
    except (ValueError, TypeError) as e:
        problems.append(str(e))
        settings = None
    problems += filter(None, (
        int_setting_problem("num_rounds", num_rounds), int_setting_problem("local_epochs", local_epochs),
        int_setting_problem("local_steps", local_steps, optional=True),
        int_setting_problem("min_clients", min_clients, optional=True),
        int_setting_problem("max_failed_sites", max_failed_sites, minimum=0)))
    from flare_duallora.training.tasks import TASK_SETTINGS

    if task not in TASK_SETTINGS:
        problems.append(f"setting 'task' = {task!r}: expected one of {TASK_SETTINGS}")
        task = "auto"
    dp = _privacy_settings(differential_privacy, settings, num_rounds, problems)
    code = code_in_overrides(dict(bundle_overrides or {}))
    for site, entry in (per_site or {}).items():
        extra = entry.get("bundle_overrides")
        if extra is not None and not isinstance(extra, Mapping):
            problems.append(f"per-site config of {site!r}: 'bundle_overrides' must be a dict of config id -> value")
        elif extra:
            code += [f"{site}: {c}" for c in code_in_overrides(dict(extra))]
    if code:
        problems.append(f"setting 'bundle_overrides' holds config expressions or components, which sites refuse "
                        f"unless their local/flare_duallora.json allows job code: {'; '.join(code[:3])}")

    bundle_root = _site_path(bundle_root, "bundle_root", target, problems, base)
    datalist_dir = _site_path(datalist_dir, "datalist_dir", target, problems, base)
    if state_dir:
        _site_path(state_dir, "state_dir", target, problems, base)
    resolved_per_site = {}
    for site, entry in (per_site or {}).items():
        unknown = set(entry) - {"bundle_root", "datalist", "bundle_overrides"}
        if unknown:
            problems.append(f"per-site config of {site!r}: unknown key(s) {sorted(unknown)}; known: bundle_root, "
                            f"datalist, bundle_overrides")
        resolved_per_site[site] = {k: _site_path(v, f"{site}.{k}", target, problems, base)
                                   for k, v in entry.items() if k in ("bundle_root", "datalist")}
        if isinstance(entry.get("bundle_overrides"), Mapping):
            resolved_per_site[site]["bundle_overrides"] = dict(entry["bundle_overrides"])
    sites = list(sites or resolved_per_site or sites_of_datalist_dir(datalist_dir))
    plan = JobPlan(target, bundle_root, datalist_dir, sites, resolved_per_site)
    if target in LOCAL_TARGETS and not sites:
        problems.append("name the sites (clients): the datalist folder has no clients.json to take them from")
    if sites and max_failed_sites >= len(sites) and isinstance(max_failed_sites, int):
        problems.append(f"setting 'max_failed_sites' = {max_failed_sites} would let every one of the "
                        f"{len(sites)} sites fail")
    if min_clients and sites and min_clients > len(sites):
        problems.append(f"setting 'min_clients' = {min_clients} is more than the {len(sites)} sites named")

    # datalists: every named site needs one, where they can be seen from here
    first_datalist = None
    dp_sites: list = []
    for site in sites:
        path = _datalist_of(site, datalist_dir, resolved_per_site)
        if path is None or path.startswith(("{", PKG_SCHEME)):
            continue
        local = os.path.exists(path) or target in LOCAL_TARGETS or (datalist_dir and os.path.isdir(datalist_dir))
        if not local:
            continue
        try:
            from flare_duallora.data.datalists import read_site_datalist

            info = read_site_datalist(path)
            first_datalist = first_datalist or path
        except ValueError as e:
            problems.append(f"site {site}: {e}")
            continue
        if dp is not None:
            dp_sites.append((site, info["training"]))
    if datalist_dir is None and not any("datalist" in e for e in resolved_per_site.values()):
        plan.notes.append("no datalist given: each site's bundle must find its own data")

    # the bundle(s): parse, build, adapt, fingerprint
    combos: dict = {}  # (bundle folder, per-site overrides) -> overrides, one check per distinct combination
    for site in sites:
        entry = resolved_per_site.get(site, {})
        extra = entry.get("bundle_overrides") or {}
        combos[(entry.get("bundle_root") or bundle_root, json.dumps(extra, sort_keys=True, default=str))] = extra
    if not combos:
        combos[(bundle_root, "{}")] = {}
    plans = []
    tasks = set()
    for (root, _), extra in sorted(combos.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if not root:
            continue
        if root.startswith("{"):
            continue
        try:
            folder = resolve_bundle_path(root)
        except (ValueError, FileNotFoundError) as e:
            if target in LOCAL_TARGETS:
                problems.append(str(e))
            else:
                plan.notes.append(f"bundle {root} is not available here: the server learns the schema in round 0")
            continue
        if not os.path.isdir(folder):
            if target in LOCAL_TARGETS:
                problems.append(f"setting 'bundle_root' = {root!r}: no bundle folder at {folder}")
            else:
                plan.notes.append(f"bundle {root} is not available here: the server learns the schema in round 0")
            continue
        if settings is None:
            continue
        found = _check_bundle(folder, settings, {**dict(bundle_overrides or {}), **extra}, first_datalist,
                              allow_random_base, problems, task, bundle_ids, dp_sites if dp is not None else None, dp,
                              local_epochs, local_steps)
        if found:
            plans.append((root, found[:4]))
            tasks.add(found[4])
            plan.notes.append(f"bundle {folder}: task {found[4]} ({found[5]})")
    if len(tasks) > 1:
        problems.append(f"the sites' bundles are for different tasks ({', '.join(sorted(tasks))})")
    elif tasks:
        plan.task = tasks.pop()
    prints = {fp for _, (_, fp, _, _) in plans}
    if len(prints) > 1:
        problems.append(f"the sites' bundles build different frozen networks (fingerprints "
                        f"{', '.join(sorted(prints))}): their shared adapters could not be averaged")
    elif plans:
        plan.schema, plan.fingerprint, plan.reference_norm, plan.base_source = plans[0][1]
    if problems:
        raise JobCheckError(problems)
    return plan


def _privacy_settings(value, settings, num_rounds, problems: list):
    """The job's differential-privacy settings (``rounds`` filled from ``num_rounds``), or None; problems listed."""
    from flare_duallora.training.privacy import DPSettings, PrivacyError, check_method_settings

    try:
        dp = DPSettings.from_dict(value)
    except (PrivacyError, TypeError) as e:
        problems.append(str(e))
        return None
    if dp is None:
        return None
    if dp.rounds is None and isinstance(num_rounds, int) and not isinstance(num_rounds, bool) and num_rounds > 0:
        dp.rounds = num_rounds
    problem = check_method_settings(settings) if settings is not None else None
    if problem:
        problems.append(problem)
    return dp


def _check_privacy(adapted, runtime, dp, dp_sites, local_epochs, local_steps, problems: list) -> None:
    """DP: no BatchNorm may train, and every visible site's noise multiplier can be calibrated."""
    from flare_duallora.training.privacy import (
        PrivacyError, batchnorm_problem, make_training_step, trainable_batchnorms,
    )

    def train_mode():
        adapted.net.train()
        adapted.freeze_base_statistics()

    bad = trainable_batchnorms(adapted.net, train_mode)
    if bad:
        problems.append(batchnorm_problem(bad))
    batch_size = runtime.batch_size
    for site, items in dp_sites or []:
        try:
            make_training_step(dp.to_dict(), _Items(items), batch_size, local_epochs, local_steps)
        except PrivacyError as e:
            problems.append(f"site {site}: {e}")


class _Items(list):
    """A datalist's training items, seen as the data set a site builds from them (``len`` and ``data``)."""

    @property
    def data(self):
        return list(self)


def _check_bundle(folder: str, settings, overrides, datalist: Optional[str], allow_random_base: bool,
                  problems: list, task: str = "auto", bundle_ids: Optional[Mapping] = None, dp_sites=None, dp=None,
                  local_epochs: int = 1, local_steps: Optional[int] = None) -> Optional[tuple]:
    """Parse the bundle, build its adapted network and tell its task (refusing a bundle the plugin cannot
    evaluate); ``(schema, fingerprint, initial norm, base, task)`` or None."""
    from flare_duallora.bundle import BundleRuntime
    from flare_duallora.engine.fingerprint import fingerprint
    from flare_duallora.training.from_bundle import build_adapted, network_overrides, site_task

    try:
        merged, info = network_overrides(overrides, datalist)
        runtime = BundleRuntime(folder, overrides=merged, ids=bundle_ids)
        adapted, source = build_adapted(runtime, settings, allow_random_base)
        found, how = site_task(runtime, task, adapted.net, info.get("num_classes", runtime.num_classes))
    except (ValueError, TypeError, RuntimeError, ImportError) as e:
        problems.append(f"bundle {folder}: {e}" if str(folder) not in str(e) else str(e))
        return None
    if dp is not None:
        _check_privacy(adapted, runtime, dp, dp_sites, local_epochs, local_steps, problems)
    shared = adapted.shared_state()
    schema = {k: list(v.shape) for k, v in shared.items()}
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in shared.values()))
    return schema, fingerprint(adapted), norm, source, found.name, how
