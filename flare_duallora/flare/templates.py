"""FLARE job templates of this plugin (``job_templates/<name>``) and the ``pkg://`` bundle paths they use.

A template is a folder in nvflare's own format (``config_fed_client.conf``, ``config_fed_server.conf``,
``meta.conf``, ``info.conf``, ``info.md``); ``nvflare job create -w job_templates/<name> -j JOB -force`` turns it
into a job.  Its settings are top-level keys of the config files (``bundle_root``, ``datalist_dir``, ``method``,
``rank``, ``num_rounds``, ...), set with ``-f config_fed_client.conf key=value`` or by editing the files.

Templates are static, so they cannot know where the package is installed: their default ``bundle_root`` is
``pkg://flare_duallora/bundles/<bundle>``, which :func:`resolve_bundle_path` turns into a folder of the package
as installed *on the site* that runs the job.

Note: ``nvflare job create`` always writes an (empty) ``app/custom/`` folder, which makes the job a BYOC job in
nvflare 2.9: sites then skip the class allow-list check but the submitter needs the ``byoc`` right.
:func:`create_job_from_template` removes the empty folder by default (``byoc=False``), so the job is a plain job
that references the installed package and every site needs the ``flare_duallora.`` allow-list entry, exactly
like the jobs of :func:`flare_duallora.flare.job.build_job`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional, Union

PKG_SCHEME = "pkg://"
TEMPLATES_ENV = "FLARE_DUALLORA_JOB_TEMPLATES"
CONFIG_FILES = ("config_fed_client.conf", "config_fed_server.conf", "meta.conf")
TEMPLATE_FILES = CONFIG_FILES + ("info.conf", "info.md")


# ---------------------------------------------------------------------------------------------- bundle paths
def resolve_bundle_path(path: Union[str, os.PathLike]) -> str:
    """The folder a ``bundle_root`` setting names.

    * ``pkg://<package>/<relative path>``: a folder inside an installed Python package, e.g.
      ``pkg://flare_duallora/bundles/cmr3d_vit_classification`` (the package's reference bundle, wherever it is
      installed on this machine).  The package is located without importing it.
    * anything else: a filesystem path; ``~`` and ``$VARS`` are expanded.

    Raises ``ValueError`` on a malformed ``pkg://`` path and ``FileNotFoundError`` (naming the setting) when the
    package or the folder does not exist.
    """
    text = os.fspath(path)
    if not text.startswith(PKG_SCHEME):
        return os.path.expanduser(os.path.expandvars(text))
    package, _, rel = text[len(PKG_SCHEME):].partition("/")
    if not package or not rel.strip("/"):
        raise ValueError(f"setting 'bundle_root' = {text!r}: expected pkg://<package>/<folder in the package>")
    rel_parts = Path(rel).parts
    if ".." in rel_parts or Path(rel).is_absolute():
        raise ValueError(f"setting 'bundle_root' = {text!r}: the folder must stay inside the package")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"setting 'bundle_root' = {text!r}: package {package!r} is not installed here")
    for location in spec.submodule_search_locations:
        candidate = Path(location, *rel_parts)
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        f"setting 'bundle_root' = {text!r}: no folder {rel!r} in package {package!r} "
        f"(searched {list(spec.submodule_search_locations)})"
    )


# ---------------------------------------------------------------------------------------------- templates
def templates_dir() -> Path:
    """Where the templates are: ``$FLARE_DUALLORA_JOB_TEMPLATES``, else ``job_templates/`` of the source tree,
    else ``flare_duallora/job_templates`` (packaged copy)."""
    env = os.environ.get(TEMPLATES_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent  # .../flare_duallora/flare
    for candidate in (here.parents[1] / "job_templates", here.parent / "job_templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no job_templates folder found next to the package; set {TEMPLATES_ENV} to the folder holding them"
    )


def list_templates(root: Optional[Union[str, Path]] = None) -> list[str]:
    """Names of the templates: every sub-folder holding ``info.conf`` (what ``nvflare job create -w`` needs)."""
    root = Path(root) if root else templates_dir()
    return sorted(p.name for p in root.iterdir() if (p / "info.conf").is_file())


def template_path(name: Union[str, Path]) -> Path:
    """A template folder, given by name (``duallora_cmr3d``) or by path."""
    path = Path(name)
    if (path / "info.conf").is_file():
        return path.resolve()
    path = templates_dir() / str(name)
    if not (path / "info.conf").is_file():
        raise ValueError(f"unknown job template {str(name)!r}; known: {list_templates()}")
    return path


def _load_conf(path: Path):
    from pyhocon import ConfigFactory

    return ConfigFactory.parse_file(str(path), resolve=False)


def _save_conf(config, path: Path) -> None:
    from pyhocon import HOCONConverter

    path.write_text(HOCONConverter.to_hocon(config) + "\n")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def template_variables(name: Union[str, Path]) -> dict[str, dict[str, Any]]:
    """The settings of a template: ``{config file: {top-level key: default}}`` (lists and dicts included)."""
    folder = template_path(name)
    skip = {"format_version", "executors", "workflows", "components", "task_data_filters", "task_result_filters",
            "name", "deploy_map", "resource_spec", "mandatory_clients"}
    out = {}
    for file in CONFIG_FILES:
        config = _load_conf(folder / file)
        out[file] = {k: _plain(v) for k, v in config.items() if k not in skip}
    return out


def _plain(value: Any) -> Any:
    """pyhocon ConfigTree / lists -> plain dicts / lists."""
    from pyhocon import ConfigTree

    if isinstance(value, ConfigTree):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _hocon(value: Any) -> Any:
    from pyhocon import ConfigFactory

    if isinstance(value, Mapping):
        return ConfigFactory.from_dict({k: _hocon(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return [_hocon(v) for v in value]
    return value


def _cli_value(value: Any) -> str:
    """A value as nvflare's ``-f file key=value`` parses it (pyhocon): strings quoted so ``//`` and ``:`` survive."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _route_overrides(folder: Path, overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: value}`` -> ``{config file: {key: value}}``: a key goes to every file whose top level has it (so
    ``method`` / ``head`` reach client and server alike); ``{"config_fed_client.conf": {...}}`` targets one file."""
    known = template_variables(folder)
    routed: dict[str, dict[str, Any]] = {f: {} for f in CONFIG_FILES}
    for key, value in overrides.items():
        if key in CONFIG_FILES:
            if not isinstance(value, Mapping):
                raise ValueError(f"override {key!r}: expected a dict of settings for that file")
            routed[key].update(value)
            continue
        files = [f for f in CONFIG_FILES if key in known[f]]
        if not files:
            names = sorted({k for f in CONFIG_FILES for k in known[f]})
            raise ValueError(f"template {folder.name!r} has no setting {key!r}; its settings: {names}")
        for f in files:
            routed[f][key] = value
    return routed


def create_job_from_template(
    name: Union[str, Path],
    job_dir: Union[str, Path],
    overrides: Optional[Mapping[str, Any]] = None,
    byoc: bool = False,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 120.0,
) -> Path:
    """``nvflare job create -w <template> -j <job_dir> -force -f <file> key=value ...``, then the rest of the
    overrides, and return ``job_dir``.

    Args:
        name: template name (a folder of :func:`templates_dir`) or template folder.
        job_dir: the job folder to write (replaced when it exists).  Its base name becomes the job name.
        overrides: ``{setting: value}``; a setting goes to every config file whose top level has it (``method``
            and ``head`` to client and server, ``min_clients`` to server and ``meta.conf``); scalars go through
            nvflare's ``-f`` option, lists / dicts (``bundle_overrides``, ``blocks=[10, 11]``) are written into the
            created files.  ``{"config_fed_client.conf": {...}}`` targets one file.  Unknown settings raise.
        byoc: keep the empty ``app/custom/`` folder ``nvflare job create`` writes (a BYOC job: no allow-list
            check on the sites, but the submitter needs the ``byoc`` right).  Default: remove it, so the job is a
            plain job referencing the installed package (sites need the ``flare_duallora.`` allow-list entry).
        env: extra environment for the ``nvflare`` process (e.g. ``HOME``).
    """
    from flare_duallora.flare.simulate import nvflare_cli

    folder = template_path(name)
    job_dir = Path(job_dir).resolve()
    routed = _route_overrides(folder, dict(overrides or {}))
    cmd = nvflare_cli() + ["job", "create", "-w", str(folder), "-j", str(job_dir), "-force"]
    later: dict[str, dict[str, Any]] = {}
    for file, settings in routed.items():
        scalars = {k: v for k, v in settings.items() if _is_scalar(v)}
        later[file] = {k: v for k, v in settings.items() if not _is_scalar(v)}
        if scalars:
            cmd += ["-f", file] + [f"{k}={_cli_value(v)}" for k, v in scalars.items()]
    if job_dir.exists():
        shutil.rmtree(job_dir)
    run_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)
    client_conf = job_dir / "app" / "config" / "config_fed_client.conf"
    if proc.returncode != 0 or not client_conf.is_file():
        raise RuntimeError(f"nvflare job create failed (rc={proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for file, settings in later.items():
        if not settings:
            continue
        path = job_dir / file if file == "meta.conf" else job_dir / "app" / "config" / file
        config = _load_conf(path)
        for key, value in settings.items():
            config.pop(key, None)  # replace, not merge, a dict setting
            config.put(key, _hocon(value))
        _save_conf(config, path)
    _check_overrides(job_dir, routed)
    custom = job_dir / "app" / "custom"
    if not byoc and custom.is_dir() and not any(custom.iterdir()):
        custom.rmdir()
    return job_dir


def _check_overrides(job_dir: Path, routed: Mapping[str, Mapping[str, Any]]) -> None:
    """Fail loudly if a setting did not end up in the created job (nvflare's ``-f`` parsing is lenient)."""
    for file, settings in routed.items():
        path = job_dir / file if file == "meta.conf" else job_dir / "app" / "config" / file
        config = _load_conf(path)
        for key, value in settings.items():
            got = _plain(config.get(key, None))
            if got != value and not (isinstance(value, (list, tuple)) and list(value) == got):
                raise RuntimeError(f"{path}: setting {key!r} is {got!r} after job create, expected {value!r}")


# ---------------------------------------------------------------------------------------------- CLI
def _parse_value(text: str) -> Any:
    """``key=value`` values: JSON when it parses (numbers, lists, dicts, true/false/null), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m flare_duallora.flare.templates",
                                description="flare_duallora job templates: list them, show their settings, "
                                            "create a job (nvflare job create + settings)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="template names and folder")
    s = sub.add_parser("show", help="a template's settings and defaults")
    s.add_argument("template")
    c = sub.add_parser("create", help="create a job folder from a template")
    c.add_argument("template", help="template name or folder")
    c.add_argument("job_dir")
    c.add_argument("settings", nargs="*", metavar="key=value",
                   help="settings; values are JSON when they parse (8, [2, 3], {\"batch_size\": 4}), else strings")
    c.add_argument("--byoc", action="store_true", help="keep the empty app/custom/ folder (a BYOC job)")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            print(templates_dir())
            for name in list_templates():
                print(f"  {name}")
        elif args.command == "show":
            print(json.dumps(template_variables(args.template), indent=1))
        else:
            overrides = {}
            for item in args.settings:
                key, sep, value = item.partition("=")
                if not sep:
                    p.error(f"expected key=value, got {item!r}")
                overrides[key.strip()] = _parse_value(value)
            print(create_job_from_template(args.template, args.job_dir, overrides, byoc=args.byoc))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
