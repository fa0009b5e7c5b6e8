"""Inject adapters by role into any ``nn.Module`` and manage what is shared, private and frozen.

This is the centre of the plugin: pure torch + peft, no FLARE.  ``AdaptedNetwork`` wraps the injected network
and is the only object the FLARE executor talks to.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Mapping, Optional

import torch
from peft import LoraConfig
from peft.functional import inject_adapter_in_model, set_adapter
from peft.tuners.lora import LoraLayer
from torch import nn

from flare_duallora.engine.methods import FROZEN, LORA_KEY, PRIVATE, SHARED, MethodSpec
from flare_duallora.engine.orthogonal import (
    LEGACY_MODES, BranchRecorder, calibrated_lambda, orthogonality_penalty,
)
from flare_duallora.engine.policy import SharingPolicy
from flare_duallora.engine.settings import AdapterSettings
from flare_duallora.engine.state import check_state, export_plain, load_plain, select
from flare_duallora.engine.targets import resolve_targets, targets_regex


class AdaptedNetwork:
    """A network with adapters injected for one method.

    Build it with :func:`adapt`.  The wrapped module keeps its class (peft ``inject_adapter_in_model``), so MONAI
    code that expects the bundle's network keeps working.
    """

    def __init__(self, net: nn.Module, settings: AdapterSettings, targets: list[str]):
        self.net = net
        self.settings = settings
        self.targets = targets
        self.policy = SharingPolicy(settings.method, settings.heads, settings.head_shared)
        # FedOPAL: the penalty weight is fixed here (adapters at their seeded initialisation when built by adapt()),
        # and forward hooks exist only for the representation-level mode
        self.orth_lambda: float = 0.0
        self._branches: Optional[BranchRecorder] = None
        # the private parts that are not LoRA factors (a private head, FedBN statistics) as the site got them, before
        # any training: the global-only model uses these (it holds the base and the shared parts only)
        self._initial_private: dict[str, torch.Tensor] = {}
        self._snapshot_initial_private()
        if self.spec.orthogonal:
            self.orth_lambda = self._orth_weight()
            if settings.orth_mode == "repr" and self.orth_lambda > 0:
                self._branches = BranchRecorder(net, shared_gradient=settings.orth_gradient == "joint")

    # ------------------------------------------------------------------ roles
    @property
    def spec(self) -> MethodSpec:
        return self.policy.spec

    def roles(self) -> dict[str, str]:
        """Role of every state-dict entry (parameters and buffers)."""
        params = {n for n, _ in self.net.named_parameters()}
        # buffers (BatchNorm statistics) are never averaged: they stay with the site (FedBN); the policy's one rule
        # decides, by name for the filter and the aggregator, by name and kind here
        return {key: self.policy.role(key, buffer=key not in params) for key in self.net.state_dict()}

    def keys_with_role(self, role: str) -> list[str]:
        return [k for k, r in self.roles().items() if r == role]

    @property
    def shared_keys(self) -> list[str]:
        return self.keys_with_role(SHARED)

    @property
    def private_keys(self) -> list[str]:
        return self.keys_with_role(PRIVATE)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ state
    def shared_state(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of exactly the shared keys (what may leave the site)."""
        return select(self.net.state_dict(), self.shared_keys)

    def private_state(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the private keys (what must stay on the site)."""
        return select(self.net.state_dict(), self.private_keys)

    def load_shared(self, state: Mapping[str, torch.Tensor], source: str = "shared state") -> None:
        """Load received shared weights; private and frozen entries are refused, never touched."""
        self._load(state, self.shared_keys, source)

    def check_shared(self, state: Mapping[str, torch.Tensor], source: str = "shared state") -> None:
        """Raise :class:`StateError` unless ``state`` holds exactly the shared keys with the right shapes."""
        check_state(state, self.net.state_dict(), self.shared_keys, self.roles(), source)

    def load_private(self, state: Mapping[str, torch.Tensor], source: str = "private state") -> None:
        self._load(state, self.private_keys, source)

    def _load(self, state: Mapping[str, torch.Tensor], allowed: list[str], source: str) -> None:
        own = self.net.state_dict()
        check_state(state, own, allowed, self.roles(), source)
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(torch.as_tensor(value, dtype=own[key].dtype))

    def load_base_checkpoint(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a plain (un-adapted) checkpoint of the original network; base keys are renamed to ``.base_layer.``."""
        load_plain(self.net, state, source)
        self._snapshot_initial_private()

    def _snapshot_initial_private(self) -> None:
        own = self.net.state_dict()
        private = self.private_keys
        self._private_lora_keys = [k for k in private if LORA_KEY.search(k)]
        self._initial_private = {k: own[k].detach().clone() for k in private if not LORA_KEY.search(k)}

    @property
    def private_lora_keys(self) -> list[str]:
        return list(self._private_lora_keys)

    @property
    def has_private_parts(self) -> bool:
        """Whether the global-only model differs from the personalised one (private adapters, head or statistics)."""
        return bool(self.private_keys)

    def global_only_contents(self) -> dict:
        """What the global-only model holds and what it leaves out, by group (for export metadata and reports)."""
        roles = self.roles()

        def groups(role: str) -> list[str]:
            out = set()
            for key, r in roles.items():
                if r != role:
                    continue
                if LORA_KEY.search(key):
                    out.add("LoRA adapter(s)")
                elif self.policy.is_head_key(key):
                    out.add("head")
                elif key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
                    out.add("normalisation statistics")
                else:
                    out.add("other parameters")
            return sorted(out)

        shared, private = groups(SHARED), groups(PRIVATE)
        head_keys = [k for k in roles if self.policy.is_head_key(k)]
        if not head_keys:
            head = "none"
        elif all(roles[k] == SHARED for k in head_keys):
            head = "shared: trained by the federation"
        else:
            head = ("private to each site: left out; the global-only model carries the head as the site received it "
                    "before training (NOT trained by the federation)")
        return {"base": "frozen pretrained base" if self.spec.base_role != SHARED else "shared (trained by the "
                "federation)", "shared": shared, "private_left_out": private, "head": head,
                "trained_by_the_federation": bool(shared)}

    # ------------------------------------------------------------------ training helpers
    def regularizer(self) -> Optional[torch.Tensor]:
        """The method's extra loss term (FedOPAL penalty x :attr:`orth_lambda`), or ``None``.

        Call it after the forward pass of the step (``orth_mode = "repr"`` uses that pass's branch inputs, recorded
        by forward hooks; it returns ``None`` when no training forward pass ran since the last call).  The penalty
        is computed outside autocast (tiny r x r algebra in float64).
        """
        if not self.spec.orthogonal or self.orth_lambda <= 0:
            return None
        device_type = next(self.net.parameters()).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            if self._branches is not None:
                penalty = self._branches.penalty()
                if penalty is None:
                    return None
            else:
                penalty = orthogonality_penalty(self.net, self.settings.orth_mode,
                                                shared_gradient=self.settings.orth_gradient == "joint")
        return self.orth_lambda * penalty

    def _orth_weight(self) -> float:
        """``orth_lambda`` as given, or calibrated (``"auto"``) so the penalty starts at ``orth_share`` of ``ln K``.

        Scale-free modes are ~1 at initialisation by construction (normalised to chance); the legacy ``A`` / ``AB``
        modes are calibrated on their exact value now, i.e. at the seeded initialisation when built by :func:`adapt`.
        """
        s = self.settings
        if not s.orth_lambda_is_auto:
            return float(s.orth_lambda)
        at_init = 1.0
        if s.orth_mode in LEGACY_MODES:
            with torch.no_grad():
                at_init = float(orthogonality_penalty(self.net, s.orth_mode))
        return calibrated_lambda(self.num_classes(), s.orth_share, at_init)

    def num_classes(self) -> int:
        """Outputs of the head (the last Linear / Conv of the ``head`` modules); 2 when there is no head."""
        for head in reversed(self.settings.heads):
            try:
                module = self.net.get_submodule(head)
            except AttributeError:
                continue
            layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
            if layers:
                last = layers[-1]
                return int(last.out_features if isinstance(last, nn.Linear) else last.out_channels)
        return 2

    def freeze_base_statistics(self) -> None:
        """Keep the frozen backbone's normalisation statistics fixed (eval mode) during adapter training."""
        if self.spec.base_role == SHARED:
            return
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    @contextlib.contextmanager
    def private_adapters_disabled(self) -> Iterator[None]:
        """Temporarily the *global-only* model: the base and the shared parts only.  Private LoRA factors are zeroed
        and every other private part (a private head, FedBN statistics) is set back to the value the site started
        with, before any training: nothing the site trained for itself stays in it."""
        own = self.net.state_dict()
        private = [own[k] for k in self.private_lora_keys]
        restore = {k: v for k, v in self._initial_private.items() if k in own}
        saved = [p.detach().clone() for p in private]
        saved_rest = {k: own[k].detach().clone() for k in restore}
        try:
            with torch.no_grad():
                for p in private:
                    p.zero_()
                for k, v in restore.items():
                    own[k].copy_(v)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(private, saved):
                    p.copy_(s)
                for k, v in saved_rest.items():
                    own[k].copy_(v)

    # ------------------------------------------------------------------ export
    def export(self, kind: str = "personalised") -> dict[str, torch.Tensor]:
        """A plain state dict loadable with ``strict=True`` into the original network.

        ``personalised`` = base + every adapter; ``global`` = base + shared parts only (private adapters dropped,
        a private head and private statistics as the site received them before training).
        """
        if kind not in ("personalised", "global"):
            raise ValueError(f"export kind {kind!r}: expected 'personalised' or 'global'")
        if kind == "global":
            with self.private_adapters_disabled():
                return export_plain(self.net)
        return export_plain(self.net)


def _inject(net: nn.Module, settings: AdapterSettings, adapter: str, regex: str, seed: int) -> None:
    config = LoraConfig(
        r=settings.rank_of(adapter),
        lora_alpha=settings.alpha_of(adapter),
        lora_dropout=settings.dropout,
        target_modules=regex,
        init_lora_weights=True,  # A ~ kaiming-uniform from the seeded RNG, B = 0: output unchanged at start
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # a second adapter is intended here; peft warns about it
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        torch.manual_seed(seed)
        inject_adapter_in_model(config, net, adapter_name=adapter)


def adapt(net: nn.Module, settings: AdapterSettings) -> AdaptedNetwork:
    """Inject the method's adapters into ``net`` (in place) and set what trains.

    Every shared adapter is initialised from ``settings.seed`` so all sites start from identical weights; the
    local adapter uses ``seed + 1`` (different directions, so the FedOPAL penalty is informative from step 0).
    """
    spec = SharingPolicy(settings.method).spec
    if spec.prepare is not None:
        net, settings = spec.prepare(net, settings)
    targets: list[str] = []
    if spec.adapters:
        targets = resolve_targets(
            net, settings.target_modules, settings.blocks, settings.block_pattern, exclude=settings.heads
        )
        regex = targets_regex(targets)
        for i, adapter in enumerate(spec.adapters):
            _inject(net, settings, adapter, regex, settings.seed + i)
        # peft leaves only the last injected adapter active: activate all of them, then check.
        set_adapter(net, list(spec.adapters))
        for module in net.modules():
            if isinstance(module, LoraLayer) and list(module.active_adapters) != list(spec.adapters):
                raise RuntimeError(f"peft activated {module.active_adapters}, expected {list(spec.adapters)}")
    for head in settings.heads:
        if not any(n == head or n.startswith(head + ".") for n, _ in net.named_parameters()):
            raise ValueError(f"setting 'head' = {head!r} names no parameter of {type(net).__name__}")
    adapted = AdaptedNetwork(net, settings, targets)
    roles = adapted.roles()
    for name, param in net.named_parameters():
        param.requires_grad_(roles[name] in (SHARED, PRIVATE))
    if not adapted.trainable_parameters():
        raise ValueError(f"method {settings.method!r} left nothing to train; check 'target_modules' and 'head'")
    return adapted


__all__ = ["AdaptedNetwork", "adapt", "SHARED", "PRIVATE", "FROZEN"]
