"""What leaves a site and what the server accepts, against the attacks of issue 17 (M4, M2, M6, L1, L2, L4).

Every test drives the real filter, aggregator, controller code or engine (no simulator) with the input of the
attack and shows that it now fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import ContentBlockedException
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel

from flare_duallora.engine import FROZEN, PRIVATE, SHARED, SharingPolicy
from flare_duallora.flare.aggregator import SharedKeyAggregator
from flare_duallora.flare.filters import PrivateKeyFilter
from flare_duallora.flare.run_files import FINGERPRINT_META

G = "blocks.3.attn.qkv.lora_A.global.weight"
GB = "blocks.3.attn.qkv.lora_B.global.weight"
L = "blocks.3.attn.qkv.lora_A.local.weight"
HEAD = "classification_head.weight"
DUAL = {"method": "duallora", "head": ["classification_head"]}
# L4: a key that names the global A first and the local B last (a private tensor under a shared-looking name)
SMUGGLED = "blocks.3.attn.qkv.lora_A.global.lora_B.local.weight"


def arrays(*keys, value=1.0, shape=(4, 8)):
    return {k: np.full(shape, value, dtype=np.float32) for k in keys}


def filtered(flt, data, meta=None, kind=DataKind.WEIGHTS, ctx=None):
    return from_shareable(flt.process(DXO(kind, data=data, meta=meta or {}).to_shareable(), ctx or FLContext()))


def model(site, data, n=10, **meta):
    return FLModel(params=data, meta={"client_name": site, "dataset_size": n, FINGERPRINT_META: "fp", **meta})


# ---------------------------------------------------------------------------------------------- L4, L2: one rule
def test_l4_a_lora_key_with_two_lora_segments_is_never_shared():
    policy = SharingPolicy.from_args(DUAL)
    assert policy.role(SMUGGLED) == FROZEN
    assert policy.role("blocks.3.attn.qkv.lora_A.global.weight.extra") == FROZEN  # nothing after the factor
    assert policy.role("blocks.3.attn.qkv.lora_A.other.weight") == FROZEN  # not one of the method's adapters
    assert policy.role(G) == SHARED and policy.role(L) == PRIVATE
    # the attack on the filter and the aggregator: the smuggled key blocks the result / rejects the contribution
    with pytest.raises(ContentBlockedException, match="frozen/base"):
        filtered(PrivateKeyFilter(DUAL), arrays(G, SMUGGLED))
    agg = SharedKeyAggregator(DUAL)
    agg.reset_stats()
    agg.set_global(None, 0)
    assert not agg.accept_model(model("s1", arrays(G, SMUGGLED)))
    assert "does not share" in agg._round["rejected"]["s1"]


def test_l2_full_keeps_normalisation_statistics_private_by_name_on_filter_and_aggregator():
    full = {"method": "full"}
    policy = SharingPolicy.from_args(full)
    for stat in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert policy.role(stat) == PRIVATE, stat
    assert policy.role("bn.weight") == SHARED
    data = {"bn.weight": np.ones(4, np.float32), "bn.running_mean": np.full(4, 7.0, np.float32),
            "bn.running_var": np.full(4, 3.0, np.float32)}
    out = filtered(PrivateKeyFilter(full), dict(data))
    assert set(out.data) == {"bn.weight"}  # the site's statistics are stripped before sending
    agg = SharedKeyAggregator(full)
    agg.reset_stats()
    agg.set_global(None, 0)
    assert not agg.accept_model(model("s1", dict(data)))
    assert "running_" in agg._round["rejected"]["s1"]


def test_l2_the_executor_side_roles_come_from_the_same_rule():
    """A real network with BatchNorm under ``full``: the adapted network's roles equal the policy's by name."""
    from monai.networks.nets import DenseNet121

    from flare_duallora.engine import AdapterSettings, adapt

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, init_features=4, growth_rate=4,
                      block_config=(1, 1, 1, 1))
    adapted = adapt(net, AdapterSettings(method="full", target_modules=[]))
    roles = adapted.roles()
    by_name = SharingPolicy("full").roles(roles)
    stats = [k for k in roles if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    assert stats and all(roles[k] == PRIVATE == by_name[k] for k in stats)
    assert roles == by_name  # no buffer other than the statistics: the name rule is the whole rule
