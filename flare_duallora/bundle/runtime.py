"""Read a MONAI bundle and hand out the pieces a federated LoRA executor needs.

:class:`BundleRuntime` is a thin layer over :class:`monai.bundle.ConfigParser`.  It only resolves the config
ids it is asked for (``network_def``, ``train#dataset``, ``loss``, ...), so a model-zoo style bundle with a
``train#trainer`` (``SupervisedTrainer`` + ignite handlers) works unchanged, and the trainer is never built
unless :meth:`BundleRuntime.parsed` is called for it.

Security: a bundle config runs code (``_target_`` imports any callable, ``$`` expressions go to ``eval``).
Only load bundles that the site itself provisions or otherwise trusts.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.bundle.config_item import ConfigComponent
from monai.bundle.reference_resolver import ReferenceResolver
from torch import nn

__all__ = ["BundleConfigError", "BundleRuntime", "REQUIRED_IDS", "STANDARD_IDS", "innermost", "load_state_dict_file",
           "replaced_components"]

logger = logging.getLogger(__name__)

#: config ids that a bundle must define to be trained by the plugin
REQUIRED_IDS: tuple[str, ...] = ("network_def", "train#dataset", "validate#dataset")

#: the model-zoo ids the plugin reads; ``bundle_ids`` maps them to a bundle that names them otherwise
STANDARD_IDS: tuple[str, ...] = (
    "network_def", "train#dataset", "validate#dataset", "loss", "optimizer", "train#dataloader",
    "validate#dataloader", "validate#inferer", "validate#postprocessing", "validate#key_metric", "num_classes",
    "label_names",
)
#: config ids naming where a bundle reads its data (reported when an item cannot be loaded)
DATA_SOURCE_IDS: tuple[str, ...] = (
    "dataset_dir", "data_root", "datalist", "data_list_file_path", "train_json", "val_json", "dataset_json",
    "data_file",
)

_MISSING = object()
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
_COMPONENT_KEYS = {"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"}


class BundleConfigError(ValueError):
    """A bundle is missing, malformed or lacks a config id the plugin needs."""


def _candidates(path: Path) -> list[Path]:
    """``configs/train.json`` -> [train.json, train.yaml, train.yml] (the given suffix first)."""
    if path.suffix.lower() in _CONFIG_SUFFIXES:
        stem = path.with_suffix("")
        return [path] + [stem.with_suffix(s) for s in _CONFIG_SUFFIXES if s != path.suffix.lower()]
    return [path.with_suffix(s) for s in _CONFIG_SUFFIXES]


def replaced_components(bundle_root: str | Path, overrides: Mapping[str, Any],
                        config_file: str = "configs/train.json") -> list[str]:
    """The override ids that would replace a whole component of the bundle's main config (an item holding
    ``_target_``) rather than set a value or a component's argument.  Reads the config as data; nothing is parsed
    into objects."""
    path = next((p for p in _candidates(Path(bundle_root) / config_file) if p.is_file()), None)
    if path is None:
        return []
    config = _load_file(path)
    found = []
    for key in overrides:
        node: Any = config
        for part in re.split(r"::|#", str(key)):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = None
                break
        if isinstance(node, dict) and "_target_" in node:
            found.append(str(key))
    return found


def _load_file(path: Path) -> dict:
    """Load one JSON/YAML config file, turning syntax errors into :class:`BundleConfigError`."""
    try:
        content = ConfigParser.load_config_file(path)
    except json.JSONDecodeError as e:
        raise BundleConfigError(
            f"malformed JSON in bundle config file {path}: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except Exception as e:  # yaml errors, duplicate keys (ValueError), unreadable file
        raise BundleConfigError(f"cannot read bundle config file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(content, dict):
        raise BundleConfigError(f"bundle config file {path} must hold a JSON/YAML object, got {type(content).__name__}")
    return content


def _raw_lookup(content: Mapping, id: str) -> Any:
    """Look ``id`` (``a#b#0`` or ``a::b::0``) up in one raw config file, which may use nested dicts and/or
    flat ``"a#b"`` keys (as override files such as ``evaluate.json`` do).  Returns ``_MISSING`` if absent."""
    target = ReferenceResolver.split_id(ReferenceResolver.normalize_id(id))
    for key, value in content.items():
        kparts = ReferenceResolver.split_id(ReferenceResolver.normalize_id(str(key).lstrip("+")))
        if target[: len(kparts)] != kparts:
            continue
        node, found = value, True
        for part in target[len(kparts) :]:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                found = False
                break
        if found:
            return node
    return _MISSING


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load ``models/model.pt``: a plain state_dict, or a checkpoint dict holding it under ``"model"``."""
    ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    if isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping):
        ckpt = ckpt["model"]
    elif isinstance(ckpt, Mapping) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, Mapping):
        raise BundleConfigError(f"{path} does not hold a state_dict (got {type(ckpt).__name__})")
    return dict(ckpt)


class BundleRuntime:
    """Parsed view of a MONAI bundle (model-zoo conventions).

    Args:
        bundle_root: the bundle folder (holding ``configs/``, ``models/``, ``LICENSE``).
        overrides: ``{config_id: value}`` applied on top of the config files before parsing, e.g.
            ``{"datalist": "/data/site-1.json", "image_size": [32, 32, 8]}``.  Ids use ``#`` or ``::``;
            missing parent dicts are created.  ``bundle_root`` is set to the given folder first, so an
            override of ``bundle_root`` still wins.
        config_files: config files relative to ``bundle_root`` (or absolute), merged in order.  A ``.json`` name
            also matches ``.yaml``/``.yml``.  The first file must exist; later ones (e.g.
            ``configs/evaluate.json``) are skipped with a warning when absent.
        required: config ids checked at construction time (default :data:`REQUIRED_IDS`).
        ids: ``{standard id: the bundle's id}`` for a bundle whose ids differ from the model-zoo convention (the
            zoo's ``classification_template``: ``{"train#dataset": "train_dataset", "validate#dataset":
            "val_dataset", "loss": "lossfn"}``); standard ids are :data:`STANDARD_IDS`, a mapped id also maps
            its children (``train#dataset#transform`` -> ``train_dataset#transform``).

    Raises:
        BundleConfigError: missing bundle folder, config file or ``configs/metadata.json``; malformed JSON/YAML;
            a required id that is absent (the message names the id and the config file).
    """

    def __init__(
        self,
        bundle_root: str | Path,
        overrides: Mapping[str, Any] | None = None,
        config_files: Sequence[str | Path] = ("configs/train.json",),
        required: Iterable[str] = REQUIRED_IDS,
        ids: Mapping[str, str] | None = None,
    ) -> None:
        self.ids: dict[str, str] = {}
        for key, value in dict(ids or {}).items():
            std = ReferenceResolver.normalize_id(str(key)).replace("::", "#")
            if std not in STANDARD_IDS:
                raise BundleConfigError(f"setting 'bundle_ids': {key!r} is not a standard id the plugin reads; "
                                        f"known: {', '.join(STANDARD_IDS)}")
            if not isinstance(value, str) or not value:
                raise BundleConfigError(f"setting 'bundle_ids': {key!r} must map to the bundle's config id (a "
                                        f"string), got {value!r}")
            self.ids[std] = value
        self.bundle_root = Path(bundle_root).expanduser().resolve()
        if not self.bundle_root.is_dir():
            raise BundleConfigError(f"bundle folder not found: {self.bundle_root}")
        if isinstance(config_files, (str, Path)):
            config_files = (config_files,)
        if not config_files:
            raise BundleConfigError("config_files must name at least one config file")

        self.config_files: list[Path] = []
        self._file_contents: list[tuple[Path, dict]] = []
        for i, name in enumerate(config_files):
            path = Path(name) if Path(name).is_absolute() else self.bundle_root / name
            found = next((p for p in _candidates(path) if p.is_file()), None)
            if found is None:
                tried = "|".join(p.suffix.lstrip(".") for p in _candidates(path))
                msg = f"bundle config file not found: {path.with_suffix('')}.{tried} (bundle {self.bundle_root})"
                if i == 0:
                    raise BundleConfigError(msg)
                logger.warning("%s; skipping it", msg)
                continue
            self.config_files.append(found)
            self._file_contents.append((found, _load_file(found)))

        self.meta_file = self.bundle_root / "configs" / "metadata.json"
        if not self.meta_file.is_file():
            raise BundleConfigError(f"bundle metadata file not found: {self.meta_file}")
        self.metadata: dict = _load_file(self.meta_file)

        self.overrides: dict[str, Any] = dict(overrides or {})
        self._parser = ConfigParser()
        try:
            self._parser.read_config([str(p) for p, _ in self._file_contents])
        except Exception as e:  # pragma: no cover - the files were already loaded once above
            raise BundleConfigError(f"cannot merge bundle config files {self._files_str()}: {e}") from e
        self._parser.read_meta(str(self.meta_file))
        self._parser["bundle_root"] = str(self.bundle_root)
        # pure JSON/YAML content (deep-copyable), used to build fresh networks; overrides are applied on top
        self._base_config = copy.deepcopy(self._parser.get())
        self._apply_overrides(self._parser)

        for key in required:
            self.require(key)

    def _apply_overrides(self, parser: ConfigParser) -> None:
        """``parser.set(value, id)`` for every override (like ``parser.update`` but creating missing parents)."""
        for key, value in self.overrides.items():
            try:
                parser.set(value, key)
            except Exception as e:
                raise BundleConfigError(f"cannot apply override {key!r} to {self._files_str()}: {e}") from e

    # ------------------------------------------------------------------ raw access / errors
    @property
    def config_path(self) -> Path:
        """The main (first) config file, e.g. ``<bundle_root>/configs/train.json``."""
        return self.config_files[0]

    @property
    def parser(self) -> ConfigParser:
        """The underlying :class:`monai.bundle.ConfigParser` (advanced use)."""
        return self._parser

    def _files_str(self) -> str:
        return ", ".join(str(p) for p in self.config_files)

    def source_of(self, id: str) -> str:
        """Where ``id`` is defined, for error messages: the config file (or ``"overrides"``) defining ``id`` or
        its closest defined parent, plus the override keys that change parts of it."""
        nid = ReferenceResolver.normalize_id(self.bundle_id(id))
        parts = ReferenceResolver.split_id(nid)
        norm_overrides = {ReferenceResolver.normalize_id(k): k for k in self.overrides}
        source = None
        for n in range(len(parts), 0, -1):
            prefix = "::".join(parts[:n])
            if prefix in norm_overrides:
                source = "overrides"
                break
            for path, content in reversed(self._file_contents):
                if _raw_lookup(content, prefix) is not _MISSING:
                    source = str(path)
                    break
            if source is not None:
                break
        if source is None:
            source = self._files_str()
        changes = []  # flat keys that replace parts of ``id`` (evaluate.json style files, overrides)
        for path, content in self._file_contents:
            keys = [k for k in content if ReferenceResolver.normalize_id(str(k).lstrip("+")).startswith(nid + "::")]
            if keys and str(path) != source:
                changes.append(f"{path.name} {keys}")
        nested = [k for nk, k in norm_overrides.items() if nk.startswith(nid + "::")]
        if nested and source != "overrides":
            changes.append(f"overrides {nested}")
        if changes:
            source += f" (with {', '.join(changes)})"
        return source

    def bundle_id(self, id: str) -> str:
        """The bundle's own id for a standard ``id`` (``bundle_ids``; the longest mapped prefix wins)."""
        parts = ReferenceResolver.normalize_id(id).split("::")
        for n in range(len(parts), 0, -1):
            mapped = self.ids.get("#".join(parts[:n]))
            if mapped is not None:
                return "#".join([mapped] + parts[n:])
        return id

    def has(self, id: str) -> bool:
        """True when ``id`` (mapped by ``bundle_ids``) exists in the merged raw config."""
        return self.bundle_id(id) in self._parser

    def get(self, id: str, default: Any = None) -> Any:
        """Raw (unparsed) config content of ``id``, or ``default``."""
        return self._parser.get(self.bundle_id(id), default)

    def require(self, id: str) -> None:
        """Raise :class:`BundleConfigError` naming ``id`` and the config file(s) when ``id`` is absent."""
        if not self.has(id):
            own = self.bundle_id(id)
            named = f"'{own}' (mapped from '{id}' by bundle_ids)" if own != id else f"'{id}'"
            hint = "" if own != id else " (a bundle naming it otherwise: map it with the setting bundle_ids)"
            raise BundleConfigError(
                f"required config id {named} is missing from bundle config {self._files_str()} "
                f"(bundle {self.bundle_root}){hint}"
            )

    def data_sources(self) -> str:
        """Where the bundle reads its data, for messages: ``dataset_dir = /data/a``, ``datalist = ...``."""
        found = []
        for id in DATA_SOURCE_IDS:
            if id in self._parser:
                try:
                    value = self._parser.get_parsed_content(id)
                except Exception:  # noqa: BLE001 - for a message only
                    value = self._parser.get(id)
                found.append(f"{id} = {value}")
        return ", ".join(found) if found else f"the data ids of {self._files_str()}"

    def parsed(self, id: str, default: Any = _MISSING) -> Any:
        """Parsed content of ``id`` (instantiated components, evaluated expressions), cached by the parser.

        Returns ``default`` when ``id`` is absent (if given), else raises :class:`BundleConfigError`.
        Any error raised while building the component is re-raised as :class:`BundleConfigError` naming the id
        and the file that defines it.
        """
        if not self.has(id):
            if default is not _MISSING:
                return default
            self.require(id)
        try:
            return self._parser.get_parsed_content(self.bundle_id(id))
        except BundleConfigError:
            raise
        except Exception as e:
            raise BundleConfigError(
                f"failed to parse config id '{id}' from {self.source_of(id)}: {type(e).__name__}: {_chain_msg(e)}"
            ) from e

    # ------------------------------------------------------------------ network
    def build_network(self) -> nn.Module:
        """A NEW instance of ``network_def`` on every call.

        Each call resolves ``network_def`` in a fresh parser (config files + overrides), so no sub-component is
        shared between two networks and the datasets cached by :meth:`parsed` are not rebuilt.
        """
        self.require("network_def")
        fresh = ConfigParser(config=copy.deepcopy(self._base_config), globals=dict(self._parser.globals))
        fresh.locator = self._parser.locator  # reuse the (expensive) MONAI component table
        self._apply_overrides(fresh)  # override values are shared as given (not copied)
        try:
            net = fresh.get_parsed_content(self.bundle_id("network_def"))
        except Exception as e:
            raise BundleConfigError(
                f"failed to parse config id 'network_def' from {self.source_of('network_def')}: "
                f"{type(e).__name__}: {_chain_msg(e)}"
            ) from e
        if not isinstance(net, nn.Module):
            raise BundleConfigError(
                f"config id 'network_def' in {self.source_of('network_def')} did not build a torch.nn.Module "
                f"(got {type(net).__name__})"
            )
        return net

    @property
    def pretrained_path(self) -> Path:
        """``<bundle_root>/models/model.pt`` (may not exist)."""
        return self.bundle_root / "models" / "model.pt"

    def load_pretrained(self, net: nn.Module, strict: bool = True, map_location: str | torch.device = "cpu") -> bool:
        """Load ``models/model.pt`` into a plain ``network_def`` instance; False when the file is absent."""
        if not self.pretrained_path.is_file():
            return False
        state = load_state_dict_file(self.pretrained_path, map_location=map_location)
        try:
            net.load_state_dict(state, strict=strict)
        except RuntimeError as e:
            raise BundleConfigError(
                f"{self.pretrained_path} does not match config id 'network_def' of {self.source_of('network_def')}: {e}"
            ) from e
        return True

    # ------------------------------------------------------------------ data
    @property
    def train_dataset(self) -> Any:
        """Parsed ``train#dataset`` (built once, then cached)."""
        return self.parsed("train#dataset")

    @property
    def val_dataset(self) -> Any:
        """Parsed ``validate#dataset`` (built once, then cached)."""
        return self.parsed("validate#dataset")

    def _int(self, ids: Sequence[str], default: int) -> int:
        for id in ids:
            if self.has(id):
                return int(self.parsed(id))
        return default

    @property
    def batch_size(self) -> int:
        """``train#dataloader#batch_size`` (default 2)."""
        return self._int(["train#dataloader#batch_size"], 2)

    @property
    def val_batch_size(self) -> int:
        """``validate#dataloader#batch_size`` (default: :attr:`batch_size`)."""
        return self._int(["validate#dataloader#batch_size"], self.batch_size)

    @property
    def num_workers(self) -> int:
        """``train#dataloader#num_workers`` (default 0)."""
        return self._int(["train#dataloader#num_workers"], 0)

    @property
    def val_num_workers(self) -> int:
        """``validate#dataloader#num_workers`` (default: :attr:`num_workers`)."""
        return self._int(["validate#dataloader#num_workers"], self.num_workers)

    def train_transform(self) -> Any:
        """The train dataset's transform, from ``train#dataset#transform`` without building the dataset."""
        if self.has("train#dataset#transform"):
            return self.parsed("train#dataset#transform")
        return getattr(self.train_dataset, "transform", None)

    def train_transforms_are_random(self) -> bool:
        """True when the train transform contains a ``monai.transforms.Randomizable`` (nested Compose walked)."""
        return contains_randomizable(self.train_transform())

    # ------------------------------------------------------------------ loss / optimizer
    @property
    def loss(self) -> nn.Module:
        """The bundle's ``loss`` component (cached instance)."""
        return self.parsed("loss")

    def make_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """Build the bundle's ``optimizer`` with its ``params`` replaced by ``params``.

        The other arguments (``lr``, ``weight_decay``, ... possibly references such as ``@learning_rate``)
        are resolved by the parser one by one, so ``$@network.parameters()`` is never evaluated.
        Falls back to ``torch.optim.AdamW(params, lr=1e-3)`` when the bundle has no ``optimizer``.
        """
        raw = self.get("optimizer")
        own = self.bundle_id("optimizer")
        if raw is None:
            return torch.optim.AdamW(params, lr=1e-3)
        if not ConfigComponent.is_instantiable(raw):
            raise BundleConfigError(
                f"config id 'optimizer' in {self.source_of('optimizer')} is not a component with a '_target_'"
            )
        config: dict[str, Any] = {"_target_": raw["_target_"]}
        if "_mode_" in raw:
            config["_mode_"] = raw["_mode_"]
        for key in raw:
            if key in _COMPONENT_KEYS or key == "params":
                continue
            config[key] = self.parsed(f"{own}#{key}")
        try:
            opt = ConfigComponent(config=config, id=own, locator=self._parser.locator).instantiate(
                params=params
            )
        except Exception as e:
            raise BundleConfigError(
                f"failed to build config id 'optimizer' from {self.source_of('optimizer')}: "
                f"{type(e).__name__}: {_chain_msg(e)}"
            ) from e
        return opt

    # ------------------------------------------------------------------ labels
    @property
    def num_classes(self) -> int | None:
        """``num_classes`` config id, else ``network_def#num_classes|out_channels``, else metadata
        ``network_data_format.outputs.pred.num_channels``; None if none is defined."""
        for id in ("num_classes", "network_def#num_classes", "network_def#out_channels"):
            if self.has(id):
                try:
                    return int(self.parsed(id))
                except (BundleConfigError, TypeError, ValueError):
                    continue
        pred = self._pred_meta()
        if "num_channels" in pred:
            return int(pred["num_channels"])
        return None

    @property
    def label_names(self) -> list[str] | None:
        """``label_names`` config id, else metadata ``outputs.pred.channel_def`` (ordered by channel)."""
        if self.has("label_names"):
            names = self.parsed("label_names")
            return None if names is None else [str(n) for n in names]
        channel_def = self._pred_meta().get("channel_def")
        if isinstance(channel_def, Mapping) and channel_def:
            try:
                return [str(channel_def[k]) for k in sorted(channel_def, key=int)]
            except (TypeError, ValueError):
                return [str(v) for v in channel_def.values()]
        return None

    def _pred_meta(self) -> dict:
        pred = self.metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
        return pred if isinstance(pred, dict) else {}

    def __repr__(self) -> str:
        files = [p.name for p in self.config_files]
        return f"BundleRuntime(bundle_root={str(self.bundle_root)!r}, config_files={files})"


def innermost(e: BaseException) -> str:
    """``Type: message`` of the root cause of ``e`` (MONAI wraps a transform's own error in ``RuntimeError:
    applying transform <...>`` layers; the innermost exception is the one that says what is wrong)."""
    cur, seen = e, set()
    while (cur.__cause__ or cur.__context__) is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return f"{type(cur).__name__}: {cur}"


def _chain_msg(e: BaseException) -> str:
    """``str(e)`` plus the messages of its causes (MONAI wraps the useful error in ``__cause__``)."""
    msgs, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur).strip()
        if text and text not in msgs:
            msgs.append(text if cur is e else f"{type(cur).__name__}: {text}")
        cur = cur.__cause__ or cur.__context__
    return " <- ".join(msgs)


def contains_randomizable(transform: Any) -> bool:
    """Walk Compose-like containers looking for a ``monai.transforms.Randomizable`` transform.

    ``Compose`` itself subclasses ``Randomizable`` (it forwards ``set_random_state``), so a plain ``Compose`` is
    looked into rather than counted; its random-selection subclasses (``OneOf``, ``SomeOf``, ``RandomOrder``)
    are random by themselves.
    """
    from monai.transforms import Compose, Randomizable

    stack, seen = [transform], set()
    while stack:
        t = stack.pop()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, Compose):
            if type(t) is not Compose:
                return True
            stack.extend(t.transforms)
        elif isinstance(t, Randomizable):
            return True
        elif isinstance(t, (list, tuple)):
            stack.extend(t)
        elif isinstance(getattr(t, "transforms", None), (list, tuple)):  # e.g. a torchvision Compose
            stack.extend(t.transforms)
    return False
