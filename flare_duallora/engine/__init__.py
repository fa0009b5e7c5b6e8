"""The adapter engine: pure torch + peft, no FLARE.

``adapt(net, AdapterSettings(method=...))`` injects adapters by role and returns an :class:`AdaptedNetwork`
that knows which parameters are shared, private and frozen, loads and splits state, adds the FedOPAL penalty
and exports plain merged weights.
"""

from flare_duallora.engine.adapted import AdaptedNetwork, adapt
from flare_duallora.engine.methods import (
    FROZEN, METHODS, PRIVATE, SHARED, MethodSpec, get_method, method_names, register_method,
)
from flare_duallora.engine.orthogonal import orthogonality_penalty, pair_penalty
from flare_duallora.engine.policy import SharingPolicy
from flare_duallora.engine.settings import AdapterSettings
from flare_duallora.engine.state import StateError, export_plain, load_plain
from flare_duallora.engine.targets import resolve_targets
from flare_duallora.engine import pfedst  # noqa: E402,F401  registers the 'pfedst' method (one module, one registration)

__all__ = [
    "AdaptedNetwork", "AdapterSettings", "FROZEN", "METHODS", "MethodSpec", "PRIVATE", "SHARED", "SharingPolicy",
    "StateError", "adapt", "export_plain", "get_method", "load_plain", "method_names", "orthogonality_penalty", "pair_penalty",
    "register_method", "resolve_targets",
]
