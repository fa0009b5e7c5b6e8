"""The registry of federated fine-tuning methods and what each one shares.

A method is described by *rules on parameter names*, so the same rule can be applied where the network
exists (the site) and where it does not (the server-side aggregator, the result filter).  Every key of a
network's ``state_dict`` gets one of three roles:

``shared``   trained on the site and sent to the server, where it is averaged;
``private``  trained on the site and never leaves it;
``frozen``   not trained (the pretrained backbone, FFA-LoRA's frozen ``lora_A``).

LoRA keys look like ``<module>.lora_A.<adapter>.weight``; adapters are named by role (``global``, ``local``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

SHARED = "shared"
PRIVATE = "private"
FROZEN = "frozen"

GLOBAL = "global"
LOCAL = "local"

# a LoRA factor's key: ``<module>.lora_<A|B>.<adapter>.<weight|bias>``, anchored at the end, so the *last* LoRA
# segment decides (``x.lora_A.global.lora_B.local.weight`` is a ``local`` B key, not a ``global`` A key)
LORA_KEY = re.compile(r"\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.(?:weight|bias)$")
# any ``lora_*`` name segment: a key with a LoRA segment that is not exactly one LORA_KEY gets no trained role
LORA_SEGMENT = re.compile(r"(?:^|\.)lora_[^.]*(?=\.|$)")
# normalisation statistics (BatchNorm running stats): never averaged, whatever the method (FedBN), by name
NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

# role of a LoRA key: (factor, adapter) -> role
LoraRule = Callable[[str, str], str]


@dataclass(frozen=True)
class MethodSpec:
    """What a method injects, trains and shares."""

    name: str
    description: str
    adapters: tuple[str, ...]  # adapters injected, in order; () for methods without LoRA
    lora_rule: Optional[LoraRule]  # role of a LoRA key; None when the method has no LoRA
    base_role: str = FROZEN  # role of non-LoRA, non-head parameters
    head_shared_default: bool = True
    personalised: bool = True  # whether the method keeps anything at home
    orthogonal: bool = False  # adds the FedOPAL orthogonality penalty
    extra_roles: Optional[Callable[[str], Optional[str]]] = None  # method-specific keys (e.g. a side network)
    # builds the network to adapt from the bundle's network, and the settings to adapt it with
    # (pFedST wraps the frozen backbone with a side network and targets the side network's layers)
    prepare: Optional[Callable[[Any, Any], tuple[Any, Any]]] = None
    # head module prefix(es) the method's own network adds (pFedST's ``side.head``): head keys whatever the
    # 'head' setting says, so a policy built without the network (server, filters) gives them the same role
    heads: tuple[str, ...] = ()
    # the MONAI bundle ``network_def`` of the network the method trains, given the bundle's own ``network_def`` and
    # the settings; None when the method trains the bundle's network itself (exported bundles keep its network_def)
    export_network_def: Optional[Callable[[Any, Any], Any]] = None
    title: str = ""  # the name people know the method by (tables, plots)

    @property
    def display_name(self) -> str:
        return self.title or self.name


def _dual(factor: str, adapter: str) -> str:
    return SHARED if adapter == GLOBAL else PRIVATE


def _fedit(factor: str, adapter: str) -> str:
    return SHARED


def _ffa(factor: str, adapter: str) -> str:
    return FROZEN if factor == "A" else SHARED


def _fedsa(factor: str, adapter: str) -> str:
    return SHARED if factor == "A" else PRIVATE


def _local(factor: str, adapter: str) -> str:
    return PRIVATE


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (used by :mod:`flare_duallora.engine.pfedst` and by users).

    A name can be registered once: a second registration raises instead of silently replacing the first.
    """
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered ({METHODS[spec.name].description}); "
                         f"register a new method under another name")
    METHODS[spec.name] = spec
    return spec


def method_names() -> list[str]:
    """Every registered method, in registration order (the built-in LoRA methods first)."""
    return list(METHODS)


for _spec in (
    MethodSpec("duallora", "Med-DualLoRA: global + local LoRA, both trained, only global shared", (GLOBAL, LOCAL), _dual,
               title="Med-DualLoRA"),
    MethodSpec(
        "fedopal",
        "FedOPAL: global + local LoRA with an orthogonality penalty, only global shared",
        (GLOBAL, LOCAL),
        _dual,
        orthogonal=True,
        title="FedOPAL",
    ),
    MethodSpec("fedit", "FedIT: one LoRA, A and B shared (LoRA + FedAvg)", (GLOBAL,), _fedit, personalised=False,
               title="FedIT"),
    MethodSpec("ffa", "FFA-LoRA: A frozen at a shared seed, B trained and shared", (GLOBAL,), _ffa, personalised=False,
               title="FFA-LoRA"),
    MethodSpec("fedsa", "FedSA-LoRA: A shared, B private", (GLOBAL,), _fedsa, title="FedSA-LoRA"),
    MethodSpec("local", "Local-only: one LoRA, nothing shared", (LOCAL,), _local, head_shared_default=False,
               title="Local LoRA"),
    MethodSpec("full", "FedAvg full fine-tuning: every parameter shared", (), None, base_role=SHARED, personalised=False,
               title="FedAvg full FT"),
    MethodSpec("linear", "Linear probe: the frozen backbone and a head trained on each site (shared with head_shared)",
               (), None, head_shared_default=False, title="Linear probe"),
):
    register_method(_spec)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; the error lists the known ones.

    ``flare_duallora.engine`` imports every built-in method module, so the registry is complete as soon as any
    part of the engine is imported."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (setting 'method'); known methods: {sorted(METHODS)}") from None
