"""Site-side configuration this plugin needs: the class allow-list, the privacy scope and the site's own policy.

nvflare 2.9 refuses third-party component classes in non-BYOC jobs unless the site's ``local/resources.json``
``class_allow_list`` names them.  This plugin lists the **exact class paths** of its runtime components
(:data:`RUNTIME_CLASSES`), never a package prefix: a prefix such as ``flare_duallora.`` would let a job instantiate
any callable of the package with job-chosen arguments.  A configured list *replaces* nvflare's default one, so the
built-in entries are copied in.  The privacy scope installs :class:`PrivateKeyFilter` on every task result.  The
site policy (``local/flare_duallora.json``, :class:`~flare_duallora.flare.site_policy.SitePolicy`) says which
bundles, data folders and state folders jobs may use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from flare_duallora.engine import SharingPolicy
from flare_duallora.flare.run_files import SITE_CONFIG_FILE
from flare_duallora.flare.site_policy import SitePolicy

PACKAGE_PREFIX = "flare_duallora."  # the old, too broad entry: removed wherever it is found
# every class of this plugin a job configuration names (tests/test_site_policy.py checks the recipe's and the
# templates' jobs name no other, and that nvflare's ComponentPathAuthorizer refuses every other callable)
EXECUTOR_PATH = "flare_duallora.flare.executor.DualLoRAExecutor"
RUNTIME_CLASSES = (
    EXECUTOR_PATH,
    "flare_duallora.flare.filters.PrivateKeyFilter",
    "flare_duallora.flare.controller.PersonalisedFedAvg",
    "flare_duallora.flare.audit.ReceivedKeysAudit",
)
SCOPE_NAME = "flare_duallora_private"
FILTER_PATH = "flare_duallora.flare.filters.PrivateKeyFilter"


def _allow(existing: Sequence[str], classes: Sequence[str]) -> list:
    """``existing`` without the package prefix entry, plus ``classes``."""
    kept = [e for e in existing if e != PACKAGE_PREFIX]
    return kept + [c for c in classes if c not in kept]


def resources_config(classes: Sequence[str] = RUNTIME_CLASSES) -> dict:
    return {"format_version": 2, "class_list_enforcement_mode": "enforce",
            "class_allow_list": _allow(list(DEFAULT_CLASS_ALLOW_LIST), classes)}


def privacy_config(sharing: Mapping, on_private: str = "strip") -> dict:
    """A ``privacy.json`` whose default scope strips / blocks non-shared keys on every task result.

    ``sharing`` is the sharing rule (``SharingPolicy.to_args()``): the scope enforces that method's rule on every
    job, whatever the job itself configures.
    """
    sharing = SharingPolicy.from_args(sharing).to_args()  # validated, plain values
    return {
        "scopes": [
            {
                "name": SCOPE_NAME,
                "properties": {"method": sharing["method"]},
                "task_result_filters": [
                    {"path": FILTER_PATH, "args": {"sharing": sharing, "on_private": on_private}}
                ],
                "task_data_filters": [],
            }
        ],
        "default_scope": SCOPE_NAME,
    }


def merge_allow_list(config: dict, classes: Sequence[str] = RUNTIME_CLASSES) -> dict:
    """A ``resources.json`` content with the plugin's classes added (a site's own entries kept, the old package
    prefix removed)."""
    config = dict(config)
    config["class_allow_list"] = _allow(config.get("class_allow_list") or list(DEFAULT_CLASS_ALLOW_LIST), classes)
    return config


def job_site_policy(bundles: Iterable[Optional[str]] = (), data: Iterable[Optional[str]] = (),
                    state_root: Optional[str] = None, **settings) -> dict:
    """A site policy allowing exactly the bundles and data paths a job names: what the simulator and POC helpers
    write, where whoever builds the job also runs the sites.  ``pkg://<package>/...`` bundles allow that package;
    ``{WORKSPACE}``-relative paths are kept as they are (each site substitutes its own workspace)."""
    from flare_duallora.bundle.paths import PKG_SCHEME

    policy: dict = {"bundle_roots": [], "bundle_packages": ["flare_duallora"], "data_roots": []}
    for b in bundles:
        if not b:
            continue
        if b.startswith(PKG_SCHEME):
            package = b[len(PKG_SCHEME):].partition("/")[0]
            if package not in policy["bundle_packages"]:
                policy["bundle_packages"].append(package)
        elif b not in policy["bundle_roots"]:
            policy["bundle_roots"].append(b)
    for d in data:
        if d and d not in policy["data_roots"]:
            policy["data_roots"].append(d)
    if state_root:
        policy["state_root"] = str(state_root)
    policy.update(settings)
    SitePolicy.from_dict(policy)  # validated
    return policy


def install_site_config(
    local_dir: Union[str, Path],
    privacy: Optional[dict] = None,
    classes: Sequence[str] = RUNTIME_CLASSES,
    site_policy: Optional[Mapping] = None,
) -> list[Path]:
    """Write ``resources.json`` (allow-list), optionally ``privacy.json`` and the plugin's own site settings
    (``flare_duallora.json``, see :class:`~flare_duallora.flare.site_policy.SitePolicy`) into a ``local/`` folder.

    Works for a simulator workspace (``WS/local``), a POC participant and a provisioned startup kit.
    """
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    written = []
    resources = local / "resources.json"
    base = resources if resources.is_file() else local / "resources.json.default"
    config = json.loads(base.read_text()) if base.is_file() else resources_config(classes)
    resources.write_text(json.dumps(merge_allow_list(config, classes), indent=2))
    written.append(resources)
    if privacy is not None:
        (local / "privacy.json").write_text(json.dumps(privacy, indent=2))
        written.append(local / "privacy.json")
    if site_policy is not None:
        SitePolicy.from_dict(dict(site_policy))  # validated: unknown settings raise here, not on the site
        (local / SITE_CONFIG_FILE).write_text(json.dumps(dict(site_policy), indent=2))
        written.append(local / SITE_CONFIG_FILE)
    return written


def job_folder_paths(job_dir: Union[str, Path], exclude: Iterable[Union[str, Path]] = ()) -> tuple[list, list]:
    """``(bundles, data)``: the ``bundle_root`` and ``datalist`` / ``datalist_dir`` values the executors of an exported
    job folder name, for :func:`job_site_policy`; a path inside an ``exclude`` folder (the job folder itself, the
    workspace the sites run in) is left out: a bundle the job ships is never allowed this way."""
    import os

    from flare_duallora.deploy.job_configs import job_components

    excluded = [Path(os.path.realpath(e)) for e in exclude]
    bundles, data = [], []
    for comps in job_components(job_dir).values():
        for c in comps:
            if c["path"] != EXECUTOR_PATH:
                continue
            args = c["args"]
            for key, out in (("bundle_root", bundles), ("datalist_dir", data), ("datalist", data)):
                value = args.get(key)
                if not isinstance(value, str) or not value or value in out:
                    continue
                real = Path(os.path.realpath(value)) if os.path.isabs(value) else None
                if real is not None and any(real == e or e in real.parents for e in excluded):
                    continue
                out.append(value)
    return bundles, data
