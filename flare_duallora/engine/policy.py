"""Sharing policy: the role of every state-dict key, decided from its name alone.

The policy needs no network, so the client-side filter and the server-side aggregator apply exactly the
rule the site used to train.  Its constructor arguments are plain values so it survives FLARE's job
configuration export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

from flare_duallora.engine.methods import (
    FROZEN, LORA_KEY, LORA_SEGMENT, NORM_STATISTICS, PRIVATE, SHARED, MethodSpec, get_method,
)


def _as_tuple(value: Union[None, str, Sequence[str]]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class SharingPolicy:
    """Which keys travel for a method.

    Args:
        method: a registered method name (``duallora``, ``fedopal``, ``fedit``, ``ffa``, ``fedsa``, ``local``,
            ``full``, ``pfedst``).
        head: module name prefix(es) of the classification head, e.g. ``"vit.classification_head"``.
        head_shared: whether the head is averaged (``True``) or stays on the site; ``None`` = method default.
    """

    method: str
    head: tuple[str, ...] = field(default=())
    head_shared: Optional[bool] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", _as_tuple(self.head))
        get_method(self.method)  # validates the name

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    @property
    def head_is_shared(self) -> bool:
        return self.spec.head_shared_default if self.head_shared is None else bool(self.head_shared)

    def is_head_key(self, key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in self.head + self.spec.heads)

    def role(self, key: str, buffer: bool = False) -> str:
        """The role (``shared``, ``private`` or ``frozen``) of a state-dict key: the one rule the executor, the
        result filter and the aggregator all apply.

        * a key with a ``lora_*`` name segment must be exactly one LoRA factor ``<module>.lora_<A|B>.<adapter>.
          <weight|bias>`` of one of the method's adapters (matched at the end of the key); anything else with a
          LoRA segment (two segments, an unknown adapter) is ``frozen``: it never leaves a site;
        * normalisation statistics (``running_mean``, ``running_var``, ``num_batches_tracked``), and every buffer
          when the caller knows it is one (``buffer=True``), are never shared: ``private`` for a method that trains
          the base (``full``: FedBN), ``frozen`` otherwise.
        """
        role = self._role(key)
        if role == SHARED and (buffer or key.rsplit(".", 1)[-1] in NORM_STATISTICS):
            return PRIVATE if self.spec.base_role == SHARED else FROZEN
        return role

    def _role(self, key: str) -> str:
        spec = self.spec
        segments = LORA_SEGMENT.findall(key)
        m = LORA_KEY.search(key)
        if segments and (len(segments) != 1 or m is None):
            return FROZEN
        if spec.extra_roles is not None:
            extra = spec.extra_roles(key)
            if extra is not None:
                return extra
        if m is not None:
            if spec.lora_rule is None or m.group("adapter") not in spec.adapters:
                return FROZEN
            return spec.lora_rule(m.group("factor"), m.group("adapter"))
        if self.is_head_key(key):
            if spec.base_role == SHARED:
                return SHARED
            return SHARED if self.head_is_shared else PRIVATE
        return spec.base_role

    def roles(self, keys: Iterable[str]) -> dict[str, str]:
        return {k: self.role(k) for k in keys}

    def violations(self, keys: Iterable[str]) -> dict[str, str]:
        """Keys that must not leave a site, with their role (empty when the payload is clean)."""
        return {k: r for k in keys if (r := self.role(k)) != SHARED}

    def to_args(self) -> dict:
        """Plain arguments (for FLARE component configs)."""
        return {"method": self.method, "head": list(self.head), "head_shared": self.head_shared}

    @classmethod
    def from_args(cls, args: Mapping) -> "SharingPolicy":
        return cls(method=args["method"], head=_as_tuple(args.get("head")), head_shared=args.get("head_shared"))


__all__ = ["SharingPolicy", "SHARED", "PRIVATE", "FROZEN"]
