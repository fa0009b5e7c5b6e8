"""Read a job's component configuration the way a FLARE site or server sees it.

FLARE substitutes ``"{key}"`` references in a job's config files with the file's top-level settings (a string that
is exactly ``"{key}"`` becomes the setting's value, of any type; other strings are formatted).  These helpers do the
same, so a template job and a recipe job can be compared component by component, and a template's settings can be
checked before the job ships.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

_SVR = re.compile(r"^\{([A-Za-z_]\w*)\}$")
_STRUCTURE = ("executors", "workflows", "components", "task_data_filters", "task_result_filters")


def substitute(value: Any, variables: Mapping[str, Any]) -> Any:
    """``value`` with ``"{key}"`` references replaced from ``variables`` (recursively, as FLARE does)."""
    if isinstance(value, str):
        m = _SVR.match(value.strip())
        if m and m.group(1) in variables:
            return substitute(variables[m.group(1)], variables)
        try:
            return value.format(**variables) if "{" in value else value
        except (KeyError, IndexError, ValueError):
            return value
    if isinstance(value, Mapping):
        return {k: substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables) for v in value]
    return value


def load_conf(path: str | Path):
    """A HOCON (``.conf``) file as pyhocon parses it (references unresolved)."""
    from pyhocon import ConfigFactory

    return ConfigFactory.parse_file(str(path), resolve=False)


def plain(value: Any) -> Any:
    """pyhocon ConfigTree / lists -> plain dicts / lists."""
    from pyhocon import ConfigTree

    if isinstance(value, ConfigTree):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def load_config(path: str | Path) -> dict:
    """A job config file (``.json`` or ``.conf``) as a plain dict, unsubstituted."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return plain(load_conf(path))


def resolved_config(path: str | Path, settings: Optional[Mapping[str, Any]] = None) -> dict:
    """A config file with its ``"{key}"`` references substituted from its top-level settings (updated with
    ``settings``); the settings themselves are dropped."""
    config = load_config(path)
    variables = {k: v for k, v in config.items() if k not in _STRUCTURE and k != "format_version"}
    variables.update(settings or {})
    return {k: substitute(config[k], variables) for k in _STRUCTURE if k in config}


def _first_component(config: dict, section: str, key: str) -> dict:
    items = config.get(section) or []
    if not items:
        raise ValueError(f"the job config has no {section}")
    item = items[0]
    return item.get(key, item) if key else item


def executor_args(path: str | Path, settings: Optional[Mapping[str, Any]] = None) -> dict:
    """The arguments the site's (first) executor gets."""
    return dict(_first_component(resolved_config(path, settings), "executors", "executor").get("args", {}))


def server_args(path: str | Path, settings: Optional[Mapping[str, Any]] = None) -> dict:
    """The arguments the server's (first) workflow gets."""
    return dict(_first_component(resolved_config(path, settings), "workflows", "").get("args", {}))


def job_components(job_dir: str | Path) -> dict[str, list[dict]]:
    """``{app: [{"section", "path", "args", "tasks"}]}`` for every app of an exported or created job."""
    job_dir = Path(job_dir)
    out = {}
    for config in sorted(job_dir.glob("*/config/config_fed_*.*")):
        app = f"{config.parent.parent.name}/{config.stem}"
        resolved = resolved_config(config)
        comps = []
        for section in _STRUCTURE:
            for item in resolved.get(section) or []:
                if section == "executors":
                    comps.append({"section": section, "tasks": sorted(item.get("tasks", [])),
                                  **_path_args(item["executor"])})
                elif section.endswith("filters"):
                    for f in item.get("filters", []):
                        comps.append({"section": section, "tasks": sorted(item.get("tasks", [])), **_path_args(f)})
                else:
                    comps.append({"section": section, **_path_args(item)})
        out[app] = comps
    return out


def _path_args(item: Mapping) -> dict:
    return {"path": item.get("path") or item.get("class_path") or item.get("name"), "args": dict(item.get("args", {}))}
