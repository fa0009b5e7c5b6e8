"""State-dict helpers: select keys, validate a received payload, convert between plain and adapted names."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from flare_duallora.engine.methods import LORA_KEY


class StateError(ValueError):
    """A state dict that does not fit the network or the method (names the keys at fault)."""


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(torch.as_tensor(value).shape)


def preview_keys(keys: Iterable[str], n: int = 5) -> str:
    """The first ``n`` keys (sorted) and how many more: for error and log messages."""
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def select(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``keys`` (order kept)."""
    return {k: state[k].detach().to("cpu", copy=True) for k in keys}


def check_state(
    state: Mapping[str, object],
    own: Mapping[str, torch.Tensor],
    allowed: Iterable[str],
    roles: Mapping[str, str],
    source: str,
    require_all: bool = True,
) -> None:
    """Raise :class:`StateError` unless ``state`` holds exactly the ``allowed`` keys with the right shapes."""
    allowed = set(allowed)
    unknown = [k for k in state if k not in own]
    if unknown:
        raise StateError(f"{source}: {len(unknown)} key(s) unknown to the network: {preview_keys(unknown)}")
    refused = {k: roles[k] for k in state if k not in allowed}
    if refused:
        kinds = sorted(set(refused.values()))
        raise StateError(f"{source}: refused {len(refused)} {'/'.join(kinds)} key(s): {preview_keys(refused)}")
    wrong = [
        f"{k} {_shape(v)} (expected {tuple(own[k].shape)})" for k, v in state.items() if _shape(v) != tuple(own[k].shape)
    ]
    if wrong:
        raise StateError(f"{source}: wrong shape for {len(wrong)} key(s): {'; '.join(wrong[:5])}")
    if require_all:
        missing = allowed - set(state)
        if missing:
            raise StateError(f"{source}: missing {len(missing)} key(s): {preview_keys(missing)}")


def _lora_layers(net: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


def delta_weight(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """``scaling * B @ A`` reshaped to the base weight (Linear and Conv; lora_B is a 1x1 conv for Conv layers).

    Computed from the flattened factors rather than with peft's ``get_delta_weight``, which takes its 2-D
    branch for 1x1x1 ``Conv3d`` layers and fails (peft 0.21.2).
    """
    a = layer.lora_A[adapter].weight.flatten(1)
    b = layer.lora_B[adapter].weight.flatten(1)
    base = layer.get_base_layer().weight
    return ((b @ a) * layer.scaling[adapter]).reshape(base.shape)


def export_plain(net: nn.Module) -> dict[str, torch.Tensor]:
    """Merge every active adapter into its base weight and return the original network's state dict.

    The network is not modified.  The result loads with ``strict=True`` into a fresh, un-adapted instance.
    """
    layers = _lora_layers(net)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in net.state_dict().items():
            if LORA_KEY.search(key):
                continue
            out[key.replace(".base_layer.", ".")] = value.detach().to("cpu", copy=True)
        for name, layer in layers.items():
            key = f"{name}.weight"
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    delta = delta_weight(layer, adapter).detach().to("cpu", out[key].dtype)
                    out[key] = out[key] + delta
    return out


def plain_key_map(net: nn.Module) -> dict[str, str]:
    """Adapted key -> plain key for every non-adapter entry of an adapted network."""
    return {k: k.replace(".base_layer.", ".") for k in net.state_dict() if not LORA_KEY.search(k)}


def load_plain(net: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a checkpoint of the un-adapted network into an adapted one (strict: every base key must match)."""
    if "model" in state and not isinstance(state["model"], torch.Tensor):
        state = state["model"]
    mapping = plain_key_map(net)
    own = net.state_dict()
    missing = [p for p in mapping.values() if p not in state]
    unexpected = set(state) - set(mapping.values())
    if missing or unexpected:
        raise StateError(
            f"{source}: does not match the network "
            f"(missing {len(missing)}: {preview_keys(missing)}; unexpected {len(unexpected)}: {preview_keys(unexpected)})"
        )
    wrong = [f"{p} {_shape(state[p])} (expected {tuple(own[a].shape)})" for a, p in mapping.items()
             if _shape(state[p]) != tuple(own[a].shape)]
    if wrong:
        raise StateError(f"{source}: wrong shape for {len(wrong)} key(s): {'; '.join(wrong[:5])}")
    with torch.no_grad():
        for adapted_key, plain_key in mapping.items():
            own[adapted_key].copy_(torch.as_tensor(state[plain_key]))


def value_bytes(value) -> int:
    """Bytes of one tensor or array as it travels (element size x count)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    import numpy as np

    return int(np.asarray(value).nbytes)


def payload_bytes(payload: Mapping[str, object]) -> int:
    """Sum of the tensor bytes of a state dict (the wire format adds a small header per tensor)."""
    return sum(value_bytes(v) for v in payload.values())
