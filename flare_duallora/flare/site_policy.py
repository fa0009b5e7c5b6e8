"""A site's own rules for jobs of this plugin, read from ``<site workspace>/local/flare_duallora.json``.

The site decides, not the job.  A job names a bundle, data and a state name; the site checks each against its rules
before anything is read, parsed or written:

``bundle_roots`` ([])           folders whose bundles jobs may use (a bundle's real path must lie inside one).
``bundles`` ({})                a catalogue ``{name: folder}``: a job whose ``bundle_root`` is exactly ``name`` gets
                                that folder (the job names a bundle, the site says where it is).
``bundle_packages``             installed packages whose bundles jobs may use, as ``pkg://<package>/<folder>`` or by
  (["flare_duallora"])          path (the plugin's reference bundles); found without importing anything.
``allow_job_bundles`` (false)   whether a bundle inside the job's own folder (shipped with the job: its configs are
                                code) may be used.  Off: refused, whatever the roots say.
``data_roots`` ([])             folders a job's ``datalist`` / ``datalist_dir`` must lie in.
``allow_job_code`` (false)      whether a job's ``bundle_overrides`` may hold config expressions (``$...``,
                                ``@...``, ``%...``) or component keys (``_target_``, ...).  Off: only plain values
                                pass, so nothing a job sends runs code on the site (the bundle itself is the site's).
``override_ids`` (null)         the bundle config ids a job's ``bundle_overrides`` may set (an id and what sits under
                                it: ``"network_def"`` allows ``"network_def#hidden_size"``); null: any plain id.
``max_global_shift`` (null)     the largest relative change ``||new - previous|| / ||previous||`` of the shared part
                                of a received global model from the previous one this site received; a larger jump
                                is refused before anything changes (null: no bound).
``state_root`` (null)           where resumable state lives (``<state_root>/<participant>/<state name>``); default
                                ``<workspace>/local/flare_duallora_state/<state name>`` (a kit's ``local/`` survives
                                job resubmission).  The simulator recreates each participant's folder on every start,
                                so the plugin's simulator runs name a ``state_root`` next to the workspace.
``allowed_state_dirs`` ([])     folders outside the workspace a job's ``state_dir`` may point into.

A missing file means the defaults: the plugin's packaged bundles only, no data folder, no job code.  In the
simulator and a POC on one machine the plugin's helpers write this file for the paths the job names (whoever builds
the job there also runs the sites); a production site's operator writes it (``flare-duallora site-config
--bundle-root ... --data-root ...``).  A malformed file stops the site with a message naming it.

Every check quotes the job's own string, never a path read on the site.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from flare_duallora.flare.run_files import SITE_CONFIG_FILE, STATE_FOLDER

__all__ = ["SIMPLE_NAME", "SitePolicy", "SitePolicyError", "check_simple_name"]

SIMPLE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class SitePolicyError(ValueError):
    """The site's local configuration is malformed, or a job asks for something it does not allow."""


def check_simple_name(value, setting: str) -> str:
    """``value`` if it is a simple name (``[A-Za-z0-9._-]+``, not ``.`` or ``..``): no folder separators, so it can
    only ever name one folder under the site's state root."""
    if not isinstance(value, str) or not SIMPLE_NAME.match(value) or value in (".", ".."):
        raise SitePolicyError(f"setting {setting!r} = {value!r}: expected a simple name of letters, digits, '.', '_' "
                              f"and '-' (no folder separators, not '.' or '..')")
    return value


def _inside(path: Path, roots) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _real(path) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _roots(values, workspace) -> list[Path]:
    """The site's folders, ``{WORKSPACE}`` standing for the site's workspace."""
    out = []
    for v in values:
        if v.startswith("{WORKSPACE}"):
            if workspace is None:
                continue
            v = os.fspath(workspace) + v[len("{WORKSPACE}"):]
        out.append(_real(v))
    return out


_LISTS = ("bundle_roots", "bundle_packages", "data_roots", "allowed_state_dirs")
_BOOLS = ("allow_job_bundles", "allow_job_code")


@dataclass
class SitePolicy:
    bundle_roots: list = field(default_factory=list)
    bundles: dict = field(default_factory=dict)
    bundle_packages: list = field(default_factory=lambda: ["flare_duallora"])
    allow_job_bundles: bool = False
    data_roots: list = field(default_factory=list)
    allow_job_code: bool = False
    override_ids: Optional[list] = None
    max_global_shift: Optional[float] = None
    state_root: Optional[str] = None
    allowed_state_dirs: list = field(default_factory=list)

    @classmethod
    def load(cls, local_dir: str | os.PathLike) -> "SitePolicy":
        path = Path(local_dir) / SITE_CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SitePolicyError(f"site configuration {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(raw, dict):
            raise SitePolicyError(f"site configuration {path} must hold a JSON object")
        return cls.from_dict(raw, where=f"site configuration {path}")

    @classmethod
    def from_dict(cls, raw: dict, where: str = "site configuration") -> "SitePolicy":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise SitePolicyError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        policy = cls(**raw)
        for name in _BOOLS:
            if not isinstance(getattr(policy, name), bool):
                raise SitePolicyError(f"{where}: {name!r} must be true or false")
        for name in _LISTS:
            value = getattr(policy, name)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise SitePolicyError(f"{where}: {name!r} must be a list of folders (strings)")
        if not isinstance(policy.bundles, dict) or not all(
                isinstance(k, str) and SIMPLE_NAME.match(k) and isinstance(v, str) and v
                for k, v in policy.bundles.items()):
            raise SitePolicyError(f"{where}: 'bundles' must map simple names to folders")
        ids = policy.override_ids
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids)):
            raise SitePolicyError(f"{where}: 'override_ids' must be a list of config ids or null")
        shift = policy.max_global_shift
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float))
                                  or not math.isfinite(shift) or shift <= 0):
            raise SitePolicyError(f"{where}: 'max_global_shift' must be a positive number or null")
        if policy.state_root is not None and not (isinstance(policy.state_root, str) and policy.state_root):
            raise SitePolicyError(f"{where}: 'state_root' must be a folder or null")
        return policy

    # ------------------------------------------------------------------ bundles and data
    def bundle_folder(self, bundle_root: str, job_dir: Optional[str | os.PathLike], base: str | os.PathLike,
                      workspace: Optional[str | os.PathLike] = None) -> Path:
        """The folder the job's ``bundle_root`` may use on this site, or ``SitePolicyError``.

        ``job_dir``: the job's own folder on the site (its run folder, holding the app the job shipped);
        ``workspace``: the site's workspace (what ``{WORKSPACE}`` in the site's folders stands for).
        """
        from flare_duallora.bundle.paths import PKG_SCHEME, find_package_dirs, resolve_bundle_path

        text = bundle_root if isinstance(bundle_root, str) else None
        if not text:
            raise SitePolicyError(f"setting 'bundle_root' = {bundle_root!r}: expected a folder or a bundle name")
        if text in self.bundles:
            return _roots([self.bundles[text]], workspace)[0]
        if text.startswith(PKG_SCHEME):
            package = text[len(PKG_SCHEME):].partition("/")[0]
            if package not in self.bundle_packages:
                raise SitePolicyError(f"setting 'bundle_root' = {text!r}: this site does not allow bundles from "
                                      f"package {package!r} ('bundle_packages' in local/{SITE_CONFIG_FILE})")
        package_roots = [_real(d) for p in self.bundle_packages for d in find_package_dirs(p)]
        try:
            folder = _real(resolve_bundle_path(text, base=base))
        except FileNotFoundError:
            raise FileNotFoundError(f"setting 'bundle_root' = {text!r}: no such bundle on this site") from None
        if job_dir is not None and _inside(folder, [_real(job_dir)]) and not self.allow_job_bundles:
            raise SitePolicyError(
                f"setting 'bundle_root' = {text!r} names a bundle inside the job's own folder: a bundle's configs are "
                f"code, and this site does not run bundles a job ships ('allow_job_bundles' in "
                f"local/{SITE_CONFIG_FILE})")
        if not _inside(folder, package_roots + _roots(self.bundle_roots, workspace)):
            raise SitePolicyError(
                f"setting 'bundle_root' = {text!r} lies outside the bundle folders this site allows: the site decides "
                f"which bundles run ('bundle_roots' or a 'bundles' catalogue name in local/{SITE_CONFIG_FILE})")
        return folder

    def data_path(self, value: str, setting: str, base: str | os.PathLike, workspace=None, must_exist: bool = True
                  ) -> Path:
        """A job's ``datalist`` / ``datalist_dir``, if it lies inside this site's ``data_roots``."""
        from flare_duallora.bundle.paths import resolve_site_path

        if not isinstance(value, str) or not value:
            raise SitePolicyError(f"setting {setting!r} = {value!r}: expected a path")
        resolved = _real(resolve_site_path(value, setting, base, must_exist=must_exist))
        if not _inside(resolved, _roots(self.data_roots, workspace)):
            raise SitePolicyError(f"setting {setting!r} = {value!r} lies outside the data folders this site allows "
                                  f"('data_roots' in local/{SITE_CONFIG_FILE})")
        return resolved

    def check_override_ids(self, overrides) -> None:
        """Refuse override ids this site does not let jobs set (``override_ids``; null: any)."""
        if self.override_ids is None:
            return
        allowed = [i.replace("::", "#") for i in self.override_ids]
        def ok(key) -> bool:
            key = str(key).replace("::", "#")
            return any(key == a or key.startswith(a + "#") for a in allowed)

        refused = sorted(str(k) for k in overrides if not ok(k))
        if refused:
            raise SitePolicyError(f"the job's bundle_overrides set {refused}, which this site does not let jobs "
                                  f"override ('override_ids' in local/{SITE_CONFIG_FILE}: {self.override_ids})")

    # ------------------------------------------------------------------ state
    def state_dir(self, local_dir: str | os.PathLike, participant: str, key: str) -> Path:
        """Where ``participant`` keeps the resumable state of ``key`` (a simple name; see ``state_root``)."""
        check_simple_name(key, "state_name")
        if self.state_root:
            return Path(self.state_root) / participant / key
        return Path(local_dir) / STATE_FOLDER / key

    def check_state_dir(self, state_dir: str | os.PathLike, workspace: str | os.PathLike,
                        given: Optional[str] = None) -> Path:
        """``state_dir`` resolved, if it lies inside the site workspace or an allowed folder; else refuse (quoting
        ``given``, the job's own string, when there is one)."""
        resolved = _real(state_dir)
        roots = [_real(workspace)] + [_real(d) for d in self.allowed_state_dirs]
        if self.state_root:
            roots.append(_real(self.state_root))
        if not _inside(resolved, roots):
            shown = given if given is not None else os.fspath(state_dir)
            raise SitePolicyError(
                f"setting 'state_dir' = {shown!r} lies outside the site workspace and outside the folders this site "
                f"allows ('allowed_state_dirs' in local/{SITE_CONFIG_FILE}); a job may not write private state "
                f"elsewhere")
        return resolved

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
