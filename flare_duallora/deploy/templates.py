"""FLARE job templates of this plugin (``job_templates/<name>``, shipped inside the wheel as
``flare_duallora/job_templates``) and jobs created from them.

A template is a folder in nvflare's own format (``config_fed_client.conf``, ``config_fed_server.conf``,
``meta.conf``, ``info.conf``, ``info.md``).  Its settings are the top-level keys of the config files; the components
refer to them as ``"{key}"``, which FLARE substitutes when a site loads the job.  :func:`create_job_from_template`
writes a job folder with chosen settings, after the same checks as the recipe (:func:`check_job`): relative paths
are resolved for ``sim`` / ``poc`` and refused for ``prod``, the bundle is built, and the server's schema and base
fingerprint are filled in when the bundle is available.  (It does what ``nvflare job create -w <template> -f ...``
does, which nvflare 2.9 deprecates, without a subprocess; the result has no ``app/custom/`` folder, so it is a plain
job that references the installed package, not a BYOC job.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from flare_duallora.deploy.job_configs import load_conf, plain

TEMPLATES_ENV = "FLARE_DUALLORA_JOB_TEMPLATES"
APP_FILES = ("config_fed_client.conf", "config_fed_server.conf")
CONFIG_FILES = APP_FILES + ("meta.conf",)
TEMPLATE_FILES = CONFIG_FILES + ("info.conf", "info.md")
_STRUCTURE = {"format_version", "executors", "workflows", "components", "task_data_filters", "task_result_filters",
              "name", "deploy_map", "resource_spec", "mandatory_clients"}

PathLike = Union[str, os.PathLike]


def templates_dir() -> Path:
    """Where the templates are: ``$FLARE_DUALLORA_JOB_TEMPLATES``, else the package's ``job_templates`` (in the
    wheel), else ``job_templates/`` of a source checkout."""
    env = os.environ.get(TEMPLATES_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]  # .../flare_duallora
    for candidate in (here / "job_templates", here.parent / "job_templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no job_templates folder in the package; set {TEMPLATES_ENV} to the folder holding them")


def list_templates(root: Optional[PathLike] = None) -> list[str]:
    """Names of the templates: every sub-folder holding ``info.conf``."""
    root = Path(root) if root else templates_dir()
    return sorted(p.name for p in root.iterdir() if (p / "info.conf").is_file())


def template_path(name: PathLike) -> Path:
    """A template folder, given by name (``duallora_cmr3d``) or by path."""
    path = Path(name)
    if (path / "info.conf").is_file():
        return path.resolve()
    path = templates_dir() / str(name)
    if not (path / "info.conf").is_file():
        raise ValueError(f"unknown job template {str(name)!r}; known: {list_templates()}")
    return path


def template_variables(name: PathLike) -> dict[str, dict[str, Any]]:
    """The settings of a template: ``{config file: {top-level key: default}}``."""
    folder = template_path(name)
    out = {}
    for file in CONFIG_FILES:
        config = load_conf(folder / file)
        out[file] = {k: plain(v) for k, v in config.items() if k not in _STRUCTURE}
    return out


def _route(folder: Path, settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: value}`` -> ``{config file: {key: value}}``: a key goes to every file whose top level has it (so
    ``method`` / ``head`` reach client and server alike); ``{"config_fed_client.conf": {...}}`` targets one file."""
    known = template_variables(folder)
    routed: dict[str, dict[str, Any]] = {f: {} for f in CONFIG_FILES}
    for key, value in settings.items():
        if key in CONFIG_FILES:
            if not isinstance(value, Mapping):
                raise ValueError(f"setting {key!r}: expected a dict of settings for that file")
            routed[key].update(value)
            continue
        files = [f for f in CONFIG_FILES if key in known[f]]
        if not files:
            names = sorted({k for f in CONFIG_FILES for k in known[f]})
            raise ValueError(f"template {folder.name!r} has no setting {key!r}; its settings: {names}")
        for f in files:
            routed[f][key] = value
    return routed


def _effective(folder: Path, routed: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    known = template_variables(folder)
    return {f: {**known[f], **routed[f]} for f in CONFIG_FILES}


def _hocon(value: Any) -> Any:
    from pyhocon import ConfigFactory

    if isinstance(value, Mapping):
        return ConfigFactory.from_dict({k: _hocon(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return [_hocon(v) for v in value]
    return value


def _write_conf(path: Path, config, settings: Mapping[str, Any]) -> None:
    from pyhocon import HOCONConverter

    for key, value in settings.items():
        config.pop(key, None)  # replace, not merge, a dict setting
        config.put(key, _hocon(value))
    path.write_text(HOCONConverter.to_hocon(config) + "\n")


def create_job_from_template(
    name: PathLike,
    job_dir: PathLike,
    settings: Optional[Mapping[str, Any]] = None,
    target: str = "sim",
    sites: Optional[list] = None,
    check: bool = True,
) -> Path:
    """Write a job folder from a template with ``settings`` (see the module docstring) and return it.

    Args:
        name: template name (a folder of :func:`templates_dir`) or template folder.
        job_dir: the job folder to write (replaced when it exists).  Its base name becomes the job's name and, unless
            given, its ``state_name``.
        settings: ``{setting: value}``; a setting goes to every config file whose top level has it; unknown settings
            raise.  ``{"config_fed_client.conf": {...}}`` targets one file.
        target: ``sim``, ``poc`` or ``prod`` (see :func:`~flare_duallora.deploy.preflight.check_job`).
        sites: the site names the checks look datalists up for (default: the datalist folder's ``clients.json``).
        check: run the checks (and fill in the server's schema and fingerprint).

    Raises:
        JobCheckError: every problem the checks found; ValueError: an unknown setting or template.
    """
    folder = template_path(name)
    job_dir = Path(job_dir).resolve()
    settings = dict(settings or {})
    routed = _route(folder, settings)
    effective = _effective(folder, routed)
    client, server = effective["config_fed_client.conf"], effective["config_fed_server.conf"]
    if "state_name" in client and not client["state_name"]:
        for f in ("config_fed_client.conf", "config_fed_server.conf"):
            routed[f]["state_name"] = job_dir.name
    dp = client.get("differential_privacy")
    if isinstance(dp, Mapping) and dp and "rounds" not in dp:  # the budget is calibrated for the job's rounds
        routed["config_fed_client.conf"]["differential_privacy"] = {**dp, "rounds": server.get("num_rounds", 1)}
        client = {**client, "differential_privacy": routed["config_fed_client.conf"]["differential_privacy"]}
    if check:
        plan = _check(folder, client, server, target, sites)
        for key in ("datalist_dir", "bundle_root"):
            if key in client and client[key] != getattr(plan, key):
                routed["config_fed_client.conf"][key] = getattr(plan, key)
        if plan.schema is not None:
            routed["config_fed_server.conf"].update(
                schema=[[k, list(v)] for k, v in sorted(plan.schema.items())], fingerprint=plan.fingerprint,
                reference_norm=plan.reference_norm)
    if server.get("lora_aggregation", "factors") != "factors" and server.get("lora_scaling") is None:
        from flare_duallora.deploy.job_configs import executor_args
        from flare_duallora.engine import AdapterSettings

        adapter = AdapterSettings.from_dict(executor_args(folder / "config_fed_client.conf", client)["settings"])
        routed["config_fed_server.conf"]["lora_scaling"] = adapter.alpha_of("global") / adapter.rank_of("global")
    if job_dir.exists():
        shutil.rmtree(job_dir)
    (job_dir / "app" / "config").mkdir(parents=True)
    for file in APP_FILES:
        _write_conf(job_dir / "app" / "config" / file, load_conf(folder / file), routed[file])
    meta = load_conf(folder / "meta.conf")
    _write_conf(job_dir / "meta.conf", meta, {**routed["meta.conf"], "name": job_dir.name})
    return job_dir


def _check(folder: Path, client: Mapping, server: Mapping, target: str, sites):
    from flare_duallora.deploy.job_configs import executor_args, server_args
    from flare_duallora.deploy.preflight import check_job

    args = executor_args(folder / "config_fed_client.conf", client)
    controller = server_args(folder / "config_fed_server.conf", server)
    return check_job(
        target=target, settings=args["settings"], bundle_root=args["bundle_root"], sites=sites,
        datalist_dir=args.get("datalist_dir") or None, bundle_overrides=args.get("bundle_overrides"),
        allow_random_base=bool(args.get("allow_random_base")), num_rounds=controller.get("num_rounds", 1),
        local_epochs=args.get("local_epochs", 1), local_steps=args.get("local_steps"),
        min_clients=controller.get("num_clients"), max_failed_sites=controller.get("max_failed_sites", 0),
        task=args.get("task", "auto"), bundle_ids=args.get("bundle_ids"),
        differential_privacy=args.get("differential_privacy"))
