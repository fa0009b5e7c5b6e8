"""Site-side configuration this plugin needs: the class allow-list entry and the privacy scope.

nvflare 2.9 refuses third-party component classes in non-BYOC jobs unless the site's ``local/resources.json``
``class_allow_list`` names their package prefix.  A configured list *replaces* the default one, so the
built-in entries are copied in.  The privacy scope installs :class:`PrivateKeyFilter` on every task result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from flare_duallora.engine import SharingPolicy
from flare_duallora.flare.filters import PrivateKeyFilter
from flare_duallora.flare.run_files import SITE_CONFIG_FILE
from flare_duallora.flare.site_policy import SitePolicy

PACKAGE_PREFIX = "flare_duallora."
SCOPE_NAME = "flare_duallora_private"


def resources_config(extra_prefixes: Sequence[str] = (PACKAGE_PREFIX,)) -> dict:
    allow = list(DEFAULT_CLASS_ALLOW_LIST) + [p for p in extra_prefixes if p not in DEFAULT_CLASS_ALLOW_LIST]
    return {"format_version": 2, "class_list_enforcement_mode": "enforce", "class_allow_list": allow}


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
                    {
                        "path": f"{PrivateKeyFilter.__module__}.{PrivateKeyFilter.__qualname__}",
                        "args": {"sharing": sharing, "on_private": on_private},
                    }
                ],
                "task_data_filters": [],
            }
        ],
        "default_scope": SCOPE_NAME,
    }


def _merge_allow_list(path: Path, prefixes: Sequence[str]) -> dict:
    """Keep a site's existing list (its own additions) and add our prefix."""
    if path.is_file():
        with open(path) as f:
            config = json.load(f)
        allow = config.get("class_allow_list") or list(DEFAULT_CLASS_ALLOW_LIST)
        config["class_allow_list"] = allow + [p for p in prefixes if p not in allow]
        return config
    return resources_config(prefixes)


def install_site_config(
    local_dir: Union[str, Path],
    privacy: Optional[dict] = None,
    prefixes: Sequence[str] = (PACKAGE_PREFIX,),
    site_policy: Optional[Mapping] = None,
) -> list[Path]:
    """Write ``resources.json`` (allow-list), optionally ``privacy.json`` and the plugin's own site settings
    (``flare_duallora.json``: ``allow_job_code``, ``state_root``, ``allowed_state_dirs``) into a ``local/`` folder.

    Works for a simulator workspace (``WS/local``), a POC participant and a provisioned startup kit.
    """
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    written = []
    resources = local / "resources.json"
    base = resources if resources.is_file() else local / "resources.json.default"
    config = _merge_allow_list(base, prefixes)
    resources.write_text(json.dumps(config, indent=2))
    written.append(resources)
    if privacy is not None:
        (local / "privacy.json").write_text(json.dumps(privacy, indent=2))
        written.append(local / "privacy.json")
    if site_policy is not None:
        SitePolicy(**dict(site_policy))  # validated: unknown settings raise here, not on the site
        (local / SITE_CONFIG_FILE).write_text(json.dumps(dict(site_policy), indent=2))
        written.append(local / SITE_CONFIG_FILE)
    return written
