"""Where a bundle (or any site path) is, and whether a job's bundle overrides are plain values.

A path in a job means a folder *on the site*.  ``pkg://<package>/<folder>`` names a folder inside a Python package
installed there (the plugin's reference bundles: ``pkg://flare_duallora/bundles/cmr3d_vit_classification``),
found without importing anything; anything else is a filesystem path, taken as written: a job's string stays a
string (no ``~`` or ``$VARS`` expansion on the site, which would read the site's environment and could send it back
in an error).  A relative path is resolved against the folder the site process runs in (its workspace in FLARE),
which is rarely what a user means: the job builders make paths absolute before a job ships.  Errors quote the
job's own string, nothing read on the site.

Whether a job may *use* a folder is the site's decision (:mod:`flare_duallora.flare.site_policy`).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["CODE_KEYS", "PKG_SCHEME", "code_in_overrides", "find_package_dirs", "is_site_absolute",
           "resolve_bundle_path", "resolve_site_path"]

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
    locations = find_package_dirs(package)
    if not locations:
        raise FileNotFoundError(f"setting {setting!r} = {text!r}: package {package!r} is not installed here")
    for location in locations:
        candidate = Path(location, *rel_parts)
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"setting {setting!r} = {text!r}: no folder {rel!r} in package {package!r}")


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def find_package_dirs(package: str, search_path: Optional[list] = None) -> list[str]:
    """The folders of an installed package, found *without importing anything* (importing a package runs its code,
    and ``importlib.util.find_spec("a.b")`` imports ``a``): an already imported module's ``__path__`` (nothing
    new runs), else every ``<sys.path entry>/<a>/<b>`` folder.  ``package`` is a dotted name of identifiers."""
    parts = package.split(".")
    if not all(_NAME.match(p) for p in parts):
        return []
    module = sys.modules.get(package)
    found = [str(p) for p in (getattr(module, "__path__", None) or [])] if module is not None else []
    for entry in (sys.path if search_path is None else search_path):
        if not isinstance(entry, str):
            continue
        folder = Path(entry or os.getcwd(), *parts)
        if folder.is_dir() and str(folder) not in found:
            found.append(str(folder))
    return found


def resolve_site_path(path: PathLike, setting: str, base: Optional[PathLike] = None, must_exist: bool = True) -> str:
    """An absolute path for a path setting, taken as written (no ``~`` or ``$VARS`` expansion: a job's string stays
    a string), a relative path joined to ``base`` (default: the current working folder).  With ``must_exist``, a
    missing path raises ``FileNotFoundError`` quoting the setting as given (nothing read on the site)."""
    text = os.fspath(path)
    folder = Path(base) if base is not None else Path.cwd()
    resolved = Path(text) if os.path.isabs(text) else folder / text
    if must_exist and not resolved.exists():
        how = "" if os.path.isabs(text) else " (a relative path, resolved against the site's working folder)"
        raise FileNotFoundError(f"setting {setting!r} = {text!r} does not exist on this site{how}")
    return str(resolved)


_CODE_PREFIXES = ("$", "@", "%")
CODE_KEYS = ("_target_", "_requires_", "_mode_", "_disabled_", "_desc_")
_ID_SEPARATORS = re.compile(r"::|#")
_PLAIN = (str, int, float, bool, type(None))


def _id_problem(key: Any) -> Optional[str]:
    """Why an override id (or a nested key) is not plain data: it names or sits under a component key, or starts
    like an expression / reference / macro."""
    if not isinstance(key, str):
        return f"id {key!r} is not a string"
    for part in _ID_SEPARATORS.split(key):
        if part.strip() in CODE_KEYS:
            return f"id {key!r} names a component key ({part.strip()})"
        if part.lstrip().startswith(_CODE_PREFIXES):
            return f"id {key!r} holds an expression or reference ({part!r})"
    return None


def code_in_overrides(overrides: Any, where: str = "bundle_overrides") -> list[str]:
    """Every place in ``overrides`` that is not plain data, i.e. that would make MONAI's config parser run, import
    or reference code: an id that contains or sits under a component key (``_target_``, ``_requires_``,
    ``_mode_``, ``_disabled_``, ``_desc_``) at any depth, as a flattened id (``"a#_target_"``, ``"a::_target_"``)
    or a nested key; strings starting with ``$`` (eval), ``@`` / ``%`` (references and macros, which can pull in
    expressions); anything that is not plain JSON.  Empty for plain values (numbers, strings, lists, dicts)."""
    found: list[str] = []
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            problem = _id_problem(key)
            if problem:
                found.append(f"{where}[{key!r}]: {problem}")
            found += code_in_overrides(value, f"{where}[{key!r}]")
    elif isinstance(overrides, (list, tuple)):
        for i, value in enumerate(overrides):
            found += code_in_overrides(value, f"{where}[{i}]")
    elif isinstance(overrides, str):
        if overrides.lstrip().startswith(_CODE_PREFIXES):
            found.append(f"{where} = {overrides!r}")
    elif not isinstance(overrides, _PLAIN):
        found.append(f"{where}: a {type(overrides).__name__}, not plain JSON")
    return found
