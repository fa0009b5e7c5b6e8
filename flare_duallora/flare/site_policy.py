"""A site's own rules for jobs of this plugin, read from ``<site workspace>/local/flare_duallora.json``.

The site decides, not the job:

``allow_job_code`` (false)      whether a job's ``bundle_overrides`` may hold config expressions (``$...``,
                                ``@...``, ``%...``) or components (``_target_``).  Off: only plain values pass, so
                                nothing a job sends runs code on the site (the bundle itself is the site's).
``state_root`` (null)           where resumable state lives (``<state_root>/<participant>/<state name>``); default
                                ``<workspace>/local/flare_duallora_state/<state name>`` (a kit's ``local/`` survives
                                job resubmission).  The simulator recreates each participant's folder on every start,
                                so the plugin's simulator runs name a ``state_root`` next to the workspace.
``allowed_state_dirs`` ([])     folders outside the workspace a job's ``state_dir`` may point into.

A missing file means the defaults; a malformed one stops the site with a message naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from flare_duallora.flare.run_files import SITE_CONFIG_FILE, STATE_FOLDER

__all__ = ["SitePolicy", "SitePolicyError"]


class SitePolicyError(ValueError):
    """The site's local configuration is malformed, or a job asks for something it does not allow."""


@dataclass
class SitePolicy:
    allow_job_code: bool = False
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
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise SitePolicyError(f"site configuration {path}: unknown setting(s) {sorted(unknown)}; known: "
                                  f"{sorted(known)}")
        policy = cls(**raw)
        if not isinstance(policy.allow_job_code, bool):
            raise SitePolicyError(f"site configuration {path}: 'allow_job_code' must be true or false")
        if not isinstance(policy.allowed_state_dirs, list):
            raise SitePolicyError(f"site configuration {path}: 'allowed_state_dirs' must be a list of folders")
        return policy

    def state_dir(self, local_dir: str | os.PathLike, participant: str, key: str) -> Path:
        """Where ``participant`` keeps the resumable state of ``key`` (see ``state_root``)."""
        if self.state_root:
            return Path(self.state_root) / participant / key
        return Path(local_dir) / STATE_FOLDER / key

    def check_state_dir(self, state_dir: str | os.PathLike, workspace: str | os.PathLike) -> Path:
        """``state_dir`` resolved, if it lies inside the site workspace or an allowed folder; else refuse."""
        resolved = Path(os.path.realpath(state_dir))
        roots = [Path(os.path.realpath(workspace))] + [Path(os.path.realpath(d)) for d in self.allowed_state_dirs]
        if self.state_root:
            roots.append(Path(os.path.realpath(self.state_root)))
        if not any(resolved == r or r in resolved.parents for r in roots):
            raise SitePolicyError(
                f"setting 'state_dir' = {os.fspath(state_dir)!r} ({resolved}) lies outside the site workspace "
                f"{roots[0]} and outside the folders this site allows ('allowed_state_dirs' in "
                f"local/{SITE_CONFIG_FILE}); a job may not write private state elsewhere")
        return resolved
