"""Adapter settings: one plain dataclass that a job config, a bundle override or the CLI can fill in."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Union

from flare_duallora.engine.methods import get_method
from flare_duallora.engine.orthogonal import DEFAULT_MODE, DEFAULT_SHARE, MODES

#: FedOPAL: the penalty's gradient reaches the private adapter only, or both (the paper's; it leaks, see README)
ORTH_GRADIENTS = ("private", "joint")


def int_setting_problem(name: str, value: Any, minimum: int = 1, optional: bool = False) -> Optional[str]:
    """The problem with an integer job setting (``None`` if there is none): ``value`` must be an int (not a bool)
    of at least ``minimum``; ``None`` is allowed when ``optional``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return f"setting {name!r} = {value!r}: expected an integer >= {minimum}"
    return None


@dataclass
class AdapterSettings:
    """How adapters are injected and trained.

    Attributes:
        method: ``duallora`` | ``fedopal`` | ``fedit`` | ``ffa`` | ``fedsa`` | ``local`` | ``full`` | ``pfedst``.
        target_modules: regex (full match on module names) or list of name suffixes to adapt.
        blocks: ``None`` (every matching module), ``"last:2"`` / ``2`` (the last two blocks), or ``[10, 11]``.
        block_pattern: name of the transformer block container (``blocks`` in MONAI ViT).
        rank, alpha, dropout: LoRA rank, scaling numerator (scaling = alpha / rank) and dropout.
        local_rank, local_alpha: rank / alpha of the local adapter (defaults: the global ones).
        head: module prefix(es) of the classification head (trained by every method; never given LoRA).
        head_shared: whether the head is averaged; ``None`` = the method's default.
        seed: initialisation seed of shared adapters, identical on every site.
        orth_mode: FedOPAL penalty variant: ``subspace`` (default; principal angles between the global and the local
            input subspace, invariant to any re-parametrisation of an adapter), ``cosine`` (row-normalised factors),
            ``delta`` (effective updates, relative eps), ``repr`` (decorrelates the two branches' codes on the batch),
            or the scale-dependent ``A`` / ``AB`` kept for comparison.  See :mod:`flare_duallora.engine.orthogonal`.
        orth_lambda: FedOPAL penalty weight: a number >= 0, or ``"auto"`` (default; ``None`` is the same): calibrated
            so the penalty is ``orth_share`` of the initial task loss (``orth_share * ln K`` for a ``K``-class head;
            the scale-free modes are normalised to ~1 at initialisation).
        orth_share: the fraction of the initial task loss the ``"auto"`` penalty weight aims at (default 0.1).
        orth_gradient: where the FedOPAL penalty's gradient goes: ``private`` (default; the shared factors enter it
            detached, so the shared update a site sends is moved by its data alone) or ``joint`` (the paper's joint
            gradient, which moves the shared ``A_g`` away from the private ``A_l`` and so reveals the private
            subspace to a server that silences the data gradient: for comparison only, see the README).
        extra: method-specific options (e.g. pFedST side-network sizes).
    """

    method: str = "duallora"
    target_modules: Union[str, Sequence[str]] = r".*blocks\.\d+\.attn\.(qkv|out_proj)"
    blocks: Union[None, int, str, Sequence[int]] = None
    block_pattern: str = "blocks"
    rank: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    local_rank: Optional[int] = None
    local_alpha: Optional[float] = None
    head: Union[None, str, Sequence[str]] = None
    head_shared: Optional[bool] = None
    seed: int = 0
    orth_lambda: Union[float, str, None] = "auto"
    orth_mode: str = DEFAULT_MODE
    orth_share: float = DEFAULT_SHARE
    orth_gradient: str = "private"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_method(self.method)  # raises naming 'method'
        for name in ("rank", "local_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"setting {name!r} = {value!r}: the LoRA rank must be an integer > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"setting 'dropout' = {self.dropout!r}: must be in [0, 1)")
        if self.orth_mode not in MODES:
            raise ValueError(f"setting 'orth_mode' = {self.orth_mode!r}: expected one of {MODES}")
        if self.orth_gradient not in ORTH_GRADIENTS:
            raise ValueError(f"setting 'orth_gradient' = {self.orth_gradient!r}: expected one of {ORTH_GRADIENTS}")
        lam = self.orth_lambda
        if not (lam is None or lam == "auto" or (isinstance(lam, (int, float)) and not isinstance(lam, bool)
                                                  and math.isfinite(lam) and lam >= 0)):
            raise ValueError(f"setting 'orth_lambda' = {lam!r}: expected a number >= 0 or 'auto'")
        share = self.orth_share
        if not (isinstance(share, (int, float)) and not isinstance(share, bool) and math.isfinite(share) and share > 0):
            raise ValueError(f"setting 'orth_share' = {share!r}: expected a number > 0 (a fraction of the loss)")

    @property
    def orth_lambda_is_auto(self) -> bool:
        """Whether the FedOPAL weight is calibrated (``orth_lambda`` = ``"auto"`` or ``None``)."""
        return self.orth_lambda is None or self.orth_lambda == "auto"

    @property
    def heads(self) -> tuple[str, ...]:
        if self.head is None:
            return ()
        return (self.head,) if isinstance(self.head, str) else tuple(self.head)

    def rank_of(self, adapter: str) -> int:
        return self.local_rank if adapter == "local" and self.local_rank else self.rank

    def alpha_of(self, adapter: str) -> float:
        if adapter == "local" and self.local_alpha is not None:
            return self.local_alpha
        if self.alpha is not None:
            return self.alpha
        return 2.0 * self.rank_of(adapter)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not isinstance(d["target_modules"], str):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AdapterSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown adapter setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(values))
