"""Where a bundle (or any site path) is, and whether a job's bundle overrides are plain values.

A path in a job means a folder *on the site*.  ``pkg://<package>/<folder>`` names a folder inside a Python package
installed there (the plugin's reference bundles: ``pkg://flare_duallora/bundles/cmr3d_vit_classification``);
anything else is a filesystem path, with ``~`` and ``$VARS`` expanded.  A relative path is resolved against the
folder the site process runs in (its workspace in FLARE), which is rarely what a user means: the job builders make
paths absolute before a job ships, and the errors here say which folder a path was resolved against.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["PKG_SCHEME", "code_in_overrides", "is_site_absolute", "resolve_bundle_path", "resolve_site_path"]

PKG_SCHEME = "pkg://"
PathLike = Union[str, os.PathLike]


def is_site_absolute(text: str) -> bool:
    """True for ``pkg://...``, absolute paths, ``~...`` and paths that start with a ``$VAR`` or FLARE's
    ``{WORKSPACE}`` (all of which mean the same folder whatever the working folder is)."""
    text = os.fspath(text)
    return text.startswith((PKG_SCHEME, "/", "~", "$", "{WORKSPACE}")) or os.path.isabs(text)


def resolve_bundle_path(path: PathLike, setting: str = "bundle_root", base: Optional[PathLike] = None) -> str:
    """The folder a ``bundle_root`` setting names (see the module docstring); ``base`` resolves relative paths.

    Raises ``ValueError`` on a malformed ``pkg://`` path and ``FileNotFoundError`` (naming the setting) when the
    package or the folder does not exist.
    """
    text = os.fspath(path)
    if not text.startswith(PKG_SCHEME):
        return resolve_site_path(text, setting, base, must_exist=False)
    package, _, rel = text[len(PKG_SCHEME):].partition("/")
    if not package or not rel.strip("/"):
        raise ValueError(f"setting {setting!r} = {text!r}: expected pkg://<package>/<folder in the package>")
    rel_parts = Path(rel).parts
    if ".." in rel_parts or Path(rel).is_absolute():
        raise ValueError(f"setting {setting!r} = {text!r}: the folder must stay inside the package")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"setting {setting!r} = {text!r}: package {package!r} is not installed here")
    for location in spec.submodule_search_locations:
        candidate = Path(location, *rel_parts)
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        f"setting {setting!r} = {text!r}: no folder {rel!r} in package {package!r} "
        f"(searched {list(spec.submodule_search_locations)})"
    )


def resolve_site_path(path: PathLike, setting: str, base: Optional[PathLike] = None, must_exist: bool = True) -> str:
    """An absolute path for a path setting: ``~``/``$VARS`` expanded, a relative path joined to ``base`` (default:
    the current working folder).  With ``must_exist``, a missing path raises ``FileNotFoundError`` saying which
    folder a relative path was resolved against."""
    text = os.path.expanduser(os.path.expandvars(os.fspath(path)))
    folder = Path(base) if base is not None else Path.cwd()
    resolved = Path(text) if os.path.isabs(text) else folder / text
    if must_exist and not resolved.exists():
        how = "" if os.path.isabs(text) else f" (the relative path was resolved against {folder})"
        raise FileNotFoundError(f"setting {setting!r} = {os.fspath(path)!r}: {resolved} does not exist{how}")
    return str(resolved)


_CODE_PREFIXES = ("$", "@", "%")
_CODE_KEYS = ("_target_", "_requires_", "_mode_", "_disabled_")


def code_in_overrides(overrides: Any, where: str = "bundle_overrides") -> list[str]:
    """Every place in ``overrides`` that would make MONAI's config parser run or import code: strings starting with
    ``$`` (eval), ``@`` / ``%`` (references into the config, which can pull in expressions) and component keys
    such as ``_target_``.  Empty for plain values (numbers, strings, lists, dicts of those)."""
    found: list[str] = []
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            if str(key) in _CODE_KEYS or str(key).startswith(_CODE_PREFIXES):
                found.append(f"{where}[{key!r}] (key {key!r})")
            found += code_in_overrides(value, f"{where}[{key!r}]")
    elif isinstance(overrides, (list, tuple)):
        for i, value in enumerate(overrides):
            found += code_in_overrides(value, f"{where}[{i}]")
    elif isinstance(overrides, str) and overrides.startswith(_CODE_PREFIXES):
        found.append(f"{where} = {overrides!r}")
    return found
