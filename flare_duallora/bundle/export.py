"""Export a personalised (e.g. LoRA-merged) network as a stand-alone MONAI bundle.

The exported folder is a regular bundle: ``configs/`` (copied, optionally with overrides baked into the main
config), ``LICENSE``, ``docs/``, ``scripts/`` (when present in the source), ``models/model.pt`` holding a plain
``state_dict`` that loads strictly into ``network_def``, and a ``configs/metadata.json`` with a bumped version
and a changelog entry.  It loads offline with :func:`load_bundle_network` or with
``monai.bundle.load(name=<folder name>, bundle_dir=<parent folder>, device="cpu")`` (which downloads only when
``models/model.pt`` is missing).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

from .runtime import BundleConfigError, BundleRuntime

__all__ = ["bump_version", "export_bundle", "load_bundle_network"]

DEFAULT_DESCRIPTION = "personalised federated LoRA fine-tuning export (flare_duallora)"


def bump_version(version: str | None) -> str:
    """``"0.1.0" -> "0.1.1"``; a version without a trailing number gets ``".1"`` appended."""
    version = str(version or "0.0.0")
    m = re.match(r"^(.*?)(\d+)([^\d]*)$", version)
    if not m:
        return f"{version}.1"
    return f"{m.group(1)}{int(m.group(2)) + 1}{m.group(3)}"


def _find_main_config(configs_dir: Path, config_file: str) -> Path | None:
    stem = Path(config_file).with_suffix("").name
    for suffix in (".json", ".yaml", ".yml"):
        p = configs_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def export_bundle(
    src_bundle_root: str | Path,
    dst_root: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    description: str = DEFAULT_DESCRIPTION,
    config_overrides: Mapping[str, Any] | None = None,
    config_file: str = "configs/train.json",
    verify: bool = True,
    trained_weights: Mapping[str, Any] | None = None,
) -> Path:
    """Write a personalised copy of a bundle to ``dst_root`` and return ``dst_root``.

    Args:
        src_bundle_root: the bundle the network was built from.
        dst_root: the new bundle folder (created; existing files are overwritten).
        state_dict: the weights of a plain ``network_def`` instance (e.g. after merging LoRA adapters); saved
            with ``torch.save`` as ``models/model.pt`` (tensors moved to CPU and detached).
        description: the changelog text of the new version (the entry is prefixed to say it is a
            personalised FL export).
        config_overrides: config ids baked into the main config file, e.g. the ``num_classes``/``image_size``
            overrides the network was built with, so that ``network_def`` matches the weights.
        config_file: the main config file (relative to the bundle root) receiving the overrides.
        verify: rebuild ``network_def`` from the exported bundle and load the weights strictly.
        trained_weights: what ``models/model.pt`` now holds (e.g. ``{"what": ..., "site": ..., "method": ...}``);
            written to ``metadata.json`` under ``trained_weights`` and as a section of ``docs/README.md``.

    Raises:
        BundleConfigError: a missing source bundle/metadata, or (``verify``) weights that do not match.
    """
    src = Path(src_bundle_root).expanduser().resolve()
    dst = Path(dst_root).expanduser().resolve()
    if not (src / "configs").is_dir():
        raise BundleConfigError(f"source bundle has no configs/ folder: {src}")
    if not (src / "configs" / "metadata.json").is_file():
        raise BundleConfigError(f"source bundle metadata file not found: {src / 'configs' / 'metadata.json'}")
    if src == dst:
        raise BundleConfigError(f"export destination must differ from the source bundle: {dst}")
    dst.mkdir(parents=True, exist_ok=True)

    shutil.copytree(src / "configs", dst / "configs", dirs_exist_ok=True)
    for name in ("docs", "scripts"):
        if (src / name).is_dir():
            shutil.copytree(
                src / name, dst / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
    if (src / "LICENSE").is_file():
        shutil.copy2(src / "LICENSE", dst / "LICENSE")
    # large_files.yml is deliberately not copied: it points at the source weights, not the personalised ones

    if config_overrides:
        main = _find_main_config(dst / "configs", config_file)
        if main is None:
            raise BundleConfigError(f"config file {config_file} (json|yaml) not found in {dst / 'configs'}")
        _bake(main, config_overrides, every=True)
        # the other configs (inference.json, evaluate.json) get the overrides of ids they define themselves, so
        # their network_def matches the weights too
        for other in sorted((dst / "configs").iterdir()):
            if other != main and other.name != "metadata.json" and other.suffix.lower() in (".json", ".yaml", ".yml"):
                _bake(other, config_overrides, every=False)

    meta_path = dst / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    old_version = meta.get("version", "0.0.0")
    new_version = bump_version(old_version)
    today = _dt.date.today().isoformat()
    entry = f"personalised federated learning export (flare_duallora, {today}, from {old_version}): {description}"
    changelog = meta.get("changelog") if isinstance(meta.get("changelog"), dict) else {}
    meta["changelog"] = {new_version: entry, **{k: v for k, v in changelog.items() if k != new_version}}
    meta["version"] = new_version
    if trained_weights:
        meta["trained_weights"] = {**dict(trained_weights), "exported": today, "source_version": old_version}
        _describe_weights(dst, meta["trained_weights"])
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")

    models = dst / "models"
    models.mkdir(exist_ok=True)
    plain = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    torch.save(plain, models / "model.pt")

    if verify:
        load_bundle_network(dst)
    return dst


def _bake(path: Path, overrides: Mapping[str, Any], every: bool) -> None:
    """Write ``overrides`` into one config file (``every``: all of them; else those whose top-level id the file
    defines)."""
    content = ConfigParser.load_config_file(path)
    if not isinstance(content, dict):
        return
    parser = ConfigParser(config=content)
    chosen = {k: v for k, v in overrides.items() if every or re.split(r"#|::", str(k))[0] in content}
    if not chosen:
        return
    for key, value in chosen.items():
        parser.set(value, key)
    raw = parser.get()
    raw.pop(ConfigParser.meta_key, None)
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    ConfigParser.export_config_file(raw, str(path), fmt=fmt, **({"indent": 4} if fmt == "json" else {}))


def _describe_weights(dst: Path, info: Mapping[str, Any]) -> None:
    """Put a section at the top of ``docs/README.md`` saying what ``models/model.pt`` now holds."""
    docs = dst / "docs"
    docs.mkdir(exist_ok=True)
    readme = docs / "README.md"
    old = readme.read_text() if readme.is_file() else ""
    marker = "<!-- flare_duallora trained weights -->"
    if marker in old:  # re-export: replace the previous section
        old = old.split(marker, 2)[-1].lstrip("\n")
    lines = [marker, "## Trained weights in this bundle", ""]
    lines += [f"- **{k.replace('_', ' ')}**: {v}" for k, v in info.items()]
    lines += ["", "`models/model.pt` is a plain state dict of `network_def` (LoRA adapters merged into the base "
              "weights); load it with `monai.bundle.load` or `ConfigWorkflow` like any bundle.", marker, ""]
    readme.write_text("\n".join(lines) + "\n" + old)


def load_bundle_network(
    bundle_root: str | Path,
    overrides: Mapping[str, Any] | None = None,
    config_files: tuple[str, ...] = ("configs/train.json",),
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Build ``network_def`` of a bundle and load ``models/model.pt`` strictly (raw state_dict or ``{"model": ...}``).

    Only ``network_def`` is required in the config.  Raises :class:`BundleConfigError` when the weights file
    is missing or does not match.
    """
    runtime = BundleRuntime(bundle_root, overrides=overrides, config_files=config_files, required=("network_def",))
    net = runtime.build_network()
    if not runtime.load_pretrained(net, strict=True, map_location=map_location):
        raise BundleConfigError(f"bundle weights not found: {runtime.pretrained_path}")
    return net
