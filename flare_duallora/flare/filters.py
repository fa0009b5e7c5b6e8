"""Client-side task-result filter: nothing but the method's shared keys leaves the site.

Configure it with explicit task names (``["train", "submit_model", "validate"]``): nvflare 2.9.0 never applies a
job filter registered for ``"*"``.  Or install it as a site ``privacy.json`` scope, which applies to every task
and runs before job filters (see ``poc_workspace/README.md``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import ContentBlockedException, Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from flare_duallora.engine import FROZEN, PRIVATE, SharingPolicy
from flare_duallora.engine.state import preview_keys

WEIGHT_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)
STRIP, BLOCK = "strip", "block"


class PrivateKeyFilter(Filter):
    """Remove private adapter keys from outgoing weights and block anything else that is not shared.

    Args:
        method, head, head_shared: the sharing rule (same values as the executor's ``adapter`` settings).
        on_private: ``strip`` (default) removes private keys and lets the shared rest go; ``block`` refuses the
            whole result instead.  Frozen keys (base weights) always block: a payload carrying them comes from a
            misconfigured site and nothing of it is sent.
        strip_initial_metrics: also drop ``meta["initial_metrics"]`` (pre-train metrics on the global model).
        strip_site_metrics: also drop the per-site validation metrics the executor puts in ``meta``.
    """

    def __init__(
        self,
        method: str,
        head: Union[None, str, Sequence[str]] = None,
        head_shared: Optional[bool] = None,
        on_private: str = STRIP,
        strip_initial_metrics: bool = False,
        strip_site_metrics: bool = False,
    ):
        super().__init__()
        if on_private not in (STRIP, BLOCK):
            raise ValueError(f"setting 'on_private' = {on_private!r}: expected 'strip' or 'block'")
        self.method = method
        self.head = head
        self.head_shared = head_shared
        self.on_private = on_private
        self.strip_initial_metrics = strip_initial_metrics
        self.strip_site_metrics = strip_site_metrics
        self.policy = SharingPolicy(method, head or (), head_shared)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no data
        try:
            dxo = from_shareable(shareable)
        except Exception:
            raise ContentBlockedException("PrivateKeyFilter: result is not a DXO; blocked (cannot check its keys)")
        self._check(dxo, fl_ctx)
        return dxo.update_shareable(shareable)

    def _check(self, dxo: DXO, fl_ctx: FLContext) -> None:
        if dxo.data_kind == DataKind.COLLECTION:
            for sub in (dxo.data or {}).values():
                self._check(sub, fl_ctx)
            return
        if self.strip_initial_metrics:
            dxo.meta.pop(MetaKey.INITIAL_METRICS, None)
        if self.strip_site_metrics:
            dxo.meta.pop("site_metrics", None)
        if dxo.data_kind not in WEIGHT_KINDS:
            return
        data = dxo.data or {}
        roles = self.policy.roles(data)
        frozen = [k for k, r in roles.items() if r == FROZEN]
        private = [k for k, r in roles.items() if r == PRIVATE]
        site = fl_ctx.get_identity_name()
        if frozen:
            msg = (f"{site}: blocked a result carrying {len(frozen)} frozen/base key(s) not shared by method "
                   f"{self.method!r}: {preview_keys(frozen)}")
            self.log_error(fl_ctx, msg)
            raise ContentBlockedException(msg)
        if private and self.on_private == BLOCK:
            msg = f"{site}: blocked a result carrying {len(private)} private key(s): {preview_keys(private)}"
            self.log_error(fl_ctx, msg)
            raise ContentBlockedException(msg)
        for key in private:
            del data[key]
        if private:
            self.log_warning(fl_ctx, f"{site}: removed {len(private)} private key(s) before sending: {preview_keys(private)}")
        dxo.add_filter_history(type(self).__name__)
