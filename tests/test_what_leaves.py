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


# ---------------------------------------------------------------------------------------------- M4: a closed filter
from nvflare.apis.fl_constant import ReturnCode  # noqa: E402
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply  # noqa: E402

from flare_duallora.flare.filters import OUTBOUND_PROP, describe_outbound  # noqa: E402
from flare_duallora.flare.run_files import CAUSE_HEADER  # noqa: E402

FP = "sha256:" + "0f" * 32
SECRET = np.random.default_rng(17).normal(size=1024).astype(np.float32)  # a private tensor's 1,024 values


def site_ctx(schema=None, num_classes=2, label_names=("NOR", "AK")):
    """The task's context as the real executor leaves it: what the site declares it may send."""
    ctx = FLContext()
    ctx.set_prop(OUTBOUND_PROP, describe_outbound(schema if schema is not None else {G: (4, 8), GB: (4, 8)},
                                                  num_classes, label_names), private=True, sticky=False)
    return ctx


def honest_train_result():
    return DXO(DataKind.WEIGHTS, data=arrays(G, GB, L), meta={
        "NUM_STEPS_CURRENT_ROUND": 3, "dataset_size": 12, "num_examples": 12, "loss": 0.5, "bytes_sent": 256,
        FINGERPRINT_META: FP, "site_metrics": {"personalised_after_training": {"balanced_accuracy": 0.75}}})


def test_m4_an_honest_result_leaves_with_its_shared_keys_meta_and_metrics():
    out = PrivateKeyFilter(DUAL).process(honest_train_result().to_shareable(), site_ctx())
    dxo = from_shareable(out)
    assert set(out) == {ReservedHeaderKey.HEADERS, "DXO"}
    assert sorted(dxo.data) == [G, GB] and dxo.meta["dataset_size"] == 12 and dxo.meta[FINGERPRINT_META] == FP
    assert dxo.meta["site_metrics"] == {"personalised_after_training": {"balanced_accuracy": 0.75}}


def test_m4_dunder_headers_never_pass_not_even_on_error_replies():
    shareable = honest_train_result().to_shareable()
    shareable.set_header("__smuggled__", SECRET)
    with pytest.raises(ContentBlockedException, match="headers carry arrays"):
        PrivateKeyFilter(DUAL).process(shareable, site_ctx())
    shareable = honest_train_result().to_shareable()
    shareable.set_header("__smuggled__", 3.5)  # a scalar: left out, logged
    shareable.set_header("note", "x" * 100)
    out = PrivateKeyFilter(DUAL).process(shareable, site_ctx())
    assert set(out[ReservedHeaderKey.HEADERS]) == {ReservedHeaderKey.CONTENT_TYPE}
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_header("__smuggled__", SECRET)
    reply.set_header(CAUSE_HEADER, "site-1: boom")
    reply["extra"] = SECRET
    out = PrivateKeyFilter(DUAL).process(reply, site_ctx())
    assert set(out) == {ReservedHeaderKey.HEADERS}
    assert out[ReservedHeaderKey.HEADERS] == {ReservedHeaderKey.RC: ReturnCode.EXECUTION_EXCEPTION,
                                              CAUSE_HEADER: "site-1: boom"}


def test_m4_extra_top_level_keys_do_not_leave():
    shareable = honest_train_result().to_shareable()
    shareable["side_channel"] = SECRET
    with pytest.raises(ContentBlockedException, match="top-level Shareable keys carry arrays"):
        PrivateKeyFilter(DUAL).process(shareable, site_ctx())
    shareable = honest_train_result().to_shareable()
    shareable["side_channel"] = "a note"
    assert set(PrivateKeyFilter(DUAL).process(shareable, site_ctx())) == {ReservedHeaderKey.HEADERS, "DXO"}


@pytest.mark.parametrize("data", [SECRET, list(map(float, SECRET)), {"x": SECRET}])
def test_m4_app_defined_and_other_kinds_are_refused(data):
    with pytest.raises(ContentBlockedException, match="only WEIGHTS and METRICS"):
        PrivateKeyFilter(DUAL).process(DXO(DataKind.APP_DEFINED, data=data).to_shareable(), site_ctx())


@pytest.mark.parametrize("name,value,blocked", [
    ("extra_list", list(map(float, SECRET[:64])), False),
    ("extra_bytes", SECRET.tobytes(), True),
    ("extra_string", "A" * 1_000_000, False),
    ("loss", [1.0, 2.0], False),
    ("dataset_size", "12", False),
    (FINGERPRINT_META, "sha256:" + "0" * 64 + SECRET.tobytes().hex()[:4000], False),
])
def test_m4_meta_holds_only_listed_scalars(name, value, blocked):
    dxo = honest_train_result()
    dxo.meta[name] = value
    if blocked:
        with pytest.raises(ContentBlockedException, match="meta carry arrays/tensors/bytes"):
            PrivateKeyFilter(DUAL).process(dxo.to_shareable(), site_ctx())
        return
    out = from_shareable(PrivateKeyFilter(DUAL).process(dxo.to_shareable(), site_ctx()))
    assert name not in out.meta
    assert all(isinstance(v, (int, float, str, dict, list, type(None))) for v in out.meta.values())
    assert len(repr(out.meta)) < 2000


@pytest.mark.parametrize("value", [{"w": SECRET}, [SECRET], SECRET.tolist(), SECRET.astype(object)])
def test_m4_a_private_tensor_nested_in_a_shared_key_is_refused(value):
    dxo = honest_train_result()
    dxo.data[GB] = value
    with pytest.raises(ContentBlockedException, match="is not a numeric array"):
        PrivateKeyFilter(DUAL).process(dxo.to_shareable(), site_ctx())


def test_m4_shared_keys_must_have_the_schemas_shapes_and_keys():
    dxo = honest_train_result()
    dxo.data[GB] = SECRET.reshape(32, 32)  # a shared name holding another shape
    with pytest.raises(ContentBlockedException, match="shape"):
        PrivateKeyFilter(DUAL).process(dxo.to_shareable(), site_ctx())
    dxo = honest_train_result()
    dxo.data[HEAD] = SECRET.reshape(2, 512)  # shared by name (the head), not in this site's schema
    with pytest.raises(ContentBlockedException, match="differ from the schema"):
        PrivateKeyFilter(DUAL).process(dxo.to_shareable(), site_ctx())


def _exfiltrate(kinds=("personalised", "global_only")):
    """The attack of M4: a private tensor written as metrics under made-up class labels."""
    return {f"{kinds[i % 2]}/sensitivity/c{i}": float(v) for i, v in enumerate(SECRET)}


def test_m4_a_1024_value_private_tensor_is_not_recoverable_through_metrics():
    data = {"personalised/balanced_accuracy": 0.5, **_exfiltrate()}
    out = from_shareable(PrivateKeyFilter(DUAL).process(DXO(DataKind.METRICS, data=data).to_shareable(), site_ctx()))
    assert out.data == {"personalised/balanced_accuracy": 0.5}
    # with the labels the site declares, each metric has at most K per-class entries, in range, rounded
    labelled = {f"{kind}/{m}/{label}": float(abs(SECRET[i * 6 + j * 2 + n]) % 1)
                for i, kind in enumerate(("personalised", "global_only"))
                for j, m in enumerate(("sensitivity", "specificity", "auc")) for n, label in enumerate(("NOR", "AK"))}
    labelled.update({f"personalised/sensitivity/{i}": 0.5 for i in range(1024)})  # labels the bundle does not declare
    out = from_shareable(PrivateKeyFilter(DUAL).process(DXO(DataKind.METRICS, data=labelled).to_shareable(),
                                                        site_ctx()))
    assert len(out.data) == 12  # 2 kinds x 3 per-class metrics x 2 declared classes
    recovered = np.array([v for v in out.data.values()])
    assert len(recovered) < SECRET.size
    assert all(v == round(v, 6) for v in recovered)  # rounded: at most ~20 bits per entry
    # the same in a training result's meta
    dxo = honest_train_result()
    dxo.meta["site_metrics"] = {"personalised_after_training": {f"sensitivity/c{i}": float(v) % 1
                                                                for i, v in enumerate(SECRET)}}
    out = from_shareable(PrivateKeyFilter(DUAL).process(dxo.to_shareable(), site_ctx()))
    assert out.meta["site_metrics"] == {}
    # and without a declared class count no per-class entry leaves at all
    out = from_shareable(PrivateKeyFilter(DUAL).process(DXO(DataKind.METRICS, data=labelled).to_shareable(),
                                                        FLContext()))
    assert not [k for k in out.data if k.count("/") == 2]


@pytest.mark.parametrize("value", [float("inf"), 1e300, -5.0, 2.0, "0.5", b"\x00", [0.5], {"x": 0.5}, True])
def test_m4_metric_values_are_finite_scalars_in_range(value):
    out = from_shareable(PrivateKeyFilter(DUAL).process(
        DXO(DataKind.METRICS, data={"personalised/accuracy": value, "personalised/n": 4}).to_shareable(), site_ctx())
    ) if not isinstance(value, bytes) else None
    if out is None:
        with pytest.raises(ContentBlockedException):
            PrivateKeyFilter(DUAL).process(DXO(DataKind.METRICS, data={"personalised/accuracy": value})
                                           .to_shareable(), site_ctx())
        return
    assert out.data.get("personalised/accuracy") is None and out.data["personalised/n"] == 4


def test_m4_the_audit_records_kinds_keys_meta_headers_and_sizes(tmp_path):
    from flare_duallora.bench.federation import _context
    from flare_duallora.flare.audit import ReceivedKeysAudit
    from flare_duallora.flare.run_files import AUDIT_FILE, read_jsonl

    ctx = _context("server", tmp_path)
    audit = ReceivedKeysAudit()
    hostile = DXO(DataKind.APP_DEFINED, data={"x": SECRET}, meta={"blob": SECRET.tobytes()}).to_shareable()
    hostile.set_header("__smuggled__", SECRET)
    hostile["side_channel"] = "abc"
    hostile.set_header(ReservedHeaderKey.TASK_NAME, "train")
    metrics = DXO(DataKind.METRICS, data={"personalised/n": 3, 7: b"x"}).to_shareable()
    for s in (hostile, metrics, Shareable(), make_reply(ReturnCode.EXECUTION_EXCEPTION)):
        assert audit.process(s, ctx) is s
    entries = read_jsonl(next(tmp_path.rglob(AUDIT_FILE)))
    assert len(entries) == 4
    first = entries[0]
    assert first["kind"] == "APP_DEFINED" and first["keys"] == ["x"] and first["bytes"] >= SECRET.nbytes
    assert first["meta"] == ["blob"] and first["meta_bytes"] >= SECRET.nbytes
    assert "__smuggled__" in first["headers"] and first["header_bytes"] >= SECRET.nbytes
    assert first["top_level"] == ["DXO", "side_channel"]
    assert entries[1]["kind"] == "METRICS" and entries[1]["keys"] == ["7", "personalised/n"]
    assert entries[2]["kind"] == "not-a-dxo" and entries[3]["return_code"] == ReturnCode.EXECUTION_EXCEPTION


# ---------------------------------------------------------------------------------------------- M6: no crash
import json  # noqa: E402

from nvflare.apis.signal import Signal  # noqa: E402

from flare_duallora.flare.controller import PersonalisedFedAvg  # noqa: E402
from flare_duallora.flare.run_files import RUN_STATUS_FILE, SITE_RESULTS_FILE, write_json  # noqa: E402


class ScriptedServer(PersonalisedFedAvg):
    """The real workflow with the transport replaced: ``answers[task]`` is what the sites send back."""

    def __init__(self, run_dir, answers, **kw):
        super().__init__(DUAL, num_clients=2, num_rounds=1, schema={G: [4, 8]}, **kw)
        self.run_dir, self.answers, self.panics = str(run_dir), answers, []
        self.fl_ctx, self.abort_signal = FLContext(), Signal()

    def get_run_dir(self):
        return self.run_dir

    def sample_clients(self, num_clients=None):
        return ["s1", "s2"]

    def _send(self, task, model, clients):
        return list(self.answers.get(task, [])), {}  # no answer to the initial-state request: the median fallback

    def _save_server_state(self, *a, **kw):
        pass

    def panic(self, reason):
        self.panics.append(reason)

    def status(self):
        return json.loads((Path(self.run_dir) / RUN_STATUS_FILE).read_text())


from pathlib import Path  # noqa: E402


@pytest.mark.parametrize("hostile", [
    {7: np.ones((4, 8), np.float32)},  # an integer key (crashed accept_model with TypeError)
    {G: b"\x00" * 128},  # bytes where an array belongs
    {G: {"nested": np.ones((4, 8))}},  # a nested value
    {G: "1.0"},
    [np.ones((4, 8))],  # not a dict at all
])
def test_m6_a_malformed_contribution_is_a_rejection_counted_against_max_failed_sites(tmp_path, hostile):
    honest = model("s1", arrays(G))
    bad = model("s2", hostile)
    for tolerated, expected in ((1, "completed"), (0, "failed")):
        run_dir = tmp_path / str(tolerated)
        run_dir.mkdir()
        server = ScriptedServer(run_dir, {"train": [honest, bad], "validate": []}, max_failed_sites=tolerated,
                                validate_task="")
        server.run()  # never raises
        status = server.status()
        assert status["status"] == expected, status
        assert "s2" in status["failed_sites"] and "contribution rejected" in status["failed_sites"]["s2"]
        assert "s1" not in status["failed_sites"]


def metrics_result(site, metrics):
    return FLModel(metrics=metrics, meta={"client_name": site, FINGERPRINT_META: "fp"})


@pytest.mark.parametrize("hostile", [
    {7: 0.5},  # an integer key (crashed unflatten_metrics)
    {"personalised/accuracy": b"\x00\x01"},  # bytes (crashed the JSON writer)
    {"personalised/accuracy": [0.5]},
    {"personalised/accuracy": {"x": 0.5}},
    {"personalised/accuracy": "0.5"},
    {"personalised/secret": 0.5},
    {f"personalised/sensitivity/c{i}": 0.5 for i in range(5000)},
])
def test_m6_malformed_final_metrics_are_rejected_and_the_results_writer_never_crashes(tmp_path, hostile):
    honest = metrics_result("s1", {"personalised/accuracy": 0.75, "global_only/accuracy": 0.5})
    server = ScriptedServer(tmp_path, {"train": [model("s1", arrays(G)), model("s2", arrays(G))],
                                       "validate": [honest, metrics_result("s2", hostile)]}, max_failed_sites=1)
    server.run()
    status = server.status()
    assert status["status"] == "completed" and "malformed validation metrics" in status["failed_sites"]["s2"]
    results = json.loads((tmp_path / SITE_RESULTS_FILE).read_text())
    assert results["s1"] == {"personalised": {"accuracy": 0.75}, "global_only": {"accuracy": 0.5}}
    assert set(results["s2"]) == {"error"}


def test_m6_the_results_writer_itself_survives_bytes_values_and_integer_keys(tmp_path):
    write_json(tmp_path / "x.json", {"s": {7: b"\x00" * 10, "a": np.ones(3), "b": float("nan")}})
    assert json.loads((tmp_path / "x.json").read_text()) == {"s": {"7": "<10 bytes>", "a": "<ndarray>", "b": None}}


def test_m6_a_server_error_leaves_a_failed_status_not_running(tmp_path):
    class Broken(ScriptedServer):
        def _send(self, task, model, clients):
            raise RuntimeError("transport broke")

    server = Broken(tmp_path, {})
    with pytest.raises(RuntimeError):
        server.run()
    status = server.status()
    assert status["status"] == "failed" and "transport broke" in status["reason"]


# ---------------------------------------------------------------------------------------------- M2: FedOPAL
def _shared_update_in_private_subspace(shared_gradient: bool, steps: int = 5, seed: int = 1) -> tuple[list, list]:
    """A site's FedOPAL round after a hostile global (``B_g = 0``, zero head): per layer, the share of the energy of
    the shared ``A_g`` update that lies in the private ``A_l``'s row space, and the chance level ``r_l / d``."""
    import torch
    from monai.networks.nets import ViT

    from flare_duallora.engine import AdapterSettings, adapt
    from flare_duallora.engine.orthogonal import dual_layers, orthogonality_penalty

    torch.manual_seed(0)
    net = ViT(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 4), hidden_size=32, mlp_dim=64, num_layers=4,
              num_heads=4, classification=True, num_classes=3, post_activation=None)
    adapted = adapt(net, AdapterSettings(method="fedopal", target_modules=r".*blocks\.\d+\.attn\.(qkv|out_proj)",
                                         blocks="last:2", head="classification_head", rank=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():  # earlier rounds: the private adapters are trained
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for _, layer in dual_layers(adapted.net):  # the hostile global
            layer.lora_B["global"].weight.zero_()
        for name, p in adapted.net.named_parameters():
            if name.startswith("classification_head"):
                p.zero_()
    layers = dict(dual_layers(adapted.net))
    before = {n: layer.lora_A["global"].weight.detach().clone() for n, layer in layers.items()}
    private = {n: layer.lora_A["local"].weight.detach().clone() for n, layer in layers.items()}
    opt = torch.optim.Adam(adapted.trainable_parameters(), lr=1e-3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for step in range(steps):
        x = torch.randn(8, 2, 16, 16, 4, generator=torch.Generator().manual_seed(10 + step))
        out = adapted.net(x)
        loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
        penalty = orthogonality_penalty(adapted.net, adapted.settings.orth_mode, shared_gradient=shared_gradient)
        (loss + adapted.orth_lambda * penalty).backward()
        opt.step()
        opt.zero_grad()
    shares, chance = [], []
    for n, layer in layers.items():
        update = (layer.lora_A["global"].weight.detach() - before[n]).double()
        basis, _ = torch.linalg.qr(private[n].double().T)  # d x r_l: A_l's row space
        energy = float(update.pow(2).sum())
        shares.append(float((update @ basis).pow(2).sum()) / energy if energy > 0 else 0.0)
        chance.append(private[n].shape[0] / private[n].shape[1])
    return shares, chance


def test_m2_fedopal_shared_update_no_longer_reveals_the_private_subspace():
    joint, chance = _shared_update_in_private_subspace(shared_gradient=True)
    fixed, _ = _shared_update_in_private_subspace(shared_gradient=False)
    level = float(np.mean(chance))  # 4 / 32
    # the attack, with the paper's joint gradient: the shared update points into A_l's subspace (40-60 % here)
    assert np.mean(joint) > 3 * level, joint
    # now (the default): the penalty never moves A_g, the data alone does: chance level
    assert np.mean(fixed) < 1.5 * level, fixed
    # the first step after the hostile global moves nothing shared at all (the data gradient is silenced)
    first, _ = _shared_update_in_private_subspace(shared_gradient=False, steps=1)
    assert first == [0.0] * len(first)


def test_m2_the_default_training_path_uses_the_detached_penalty():
    """AdaptedNetwork.regularizer (what the trainer calls) gives no gradient to the shared adapter."""
    import torch

    from flare_duallora.engine import AdapterSettings, adapt
    from flare_duallora.engine.orthogonal import dual_layers
    from monai.networks.nets import ViT

    for mode in ("subspace", "cosine", "A", "AB"):
        torch.manual_seed(0)
        net = ViT(in_channels=1, img_size=(8, 8), patch_size=(4, 4), hidden_size=16, mlp_dim=16, num_layers=1,
                  num_heads=2, classification=True, num_classes=2, spatial_dims=2)
        adapted = adapt(net, AdapterSettings(method="fedopal", target_modules=r".*blocks\.\d+\.attn\.qkv", rank=2,
                                             orth_mode=mode, head="classification_head"))
        with torch.no_grad():
            for p in adapted.trainable_parameters():
                p.add_(0.1)
        adapted.regularizer().backward()
        for _, layer in dual_layers(adapted.net):
            assert layer.lora_A["global"].weight.grad is None, mode
            assert float(layer.lora_A["local"].weight.grad.abs().sum()) > 0, mode
    # the paper's joint gradient, a setting for comparison only (README): the shared factor gets the gradient too
    torch.manual_seed(0)
    net = ViT(in_channels=1, img_size=(8, 8), patch_size=(4, 4), hidden_size=16, mlp_dim=16, num_layers=1,
              num_heads=2, classification=True, num_classes=2, spatial_dims=2)
    adapted = adapt(net, AdapterSettings(method="fedopal", target_modules=r".*blocks\.\d+\.attn\.qkv", rank=2,
                                         head="classification_head", orth_gradient="joint"))
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(0.1)
    adapted.regularizer().backward()
    assert all(float(layer.lora_A["global"].weight.grad.abs().sum()) > 0 for _, layer in dual_layers(adapted.net))


# ---------------------------------------------------------------------------------------------- L1: exports
@pytest.mark.parametrize("method,head_shared", [("duallora", False), ("linear", None)])
def test_l1_the_global_only_model_holds_no_private_head_and_says_so(tmp_path, method, head_shared):
    import json

    import torch

    from conftest import ADAPTER, CMR_BUNDLE, TINY_CMR, write_random_cmr_site
    from flare_duallora.bundle import load_bundle_network
    from flare_duallora.training.from_bundle import build_site, export_site_bundles

    datalist = write_random_cmr_site(tmp_path, "site-x", n=6, n_val=3)
    build = build_site(CMR_BUNDLE, {**ADAPTER, "method": method, "head_shared": head_shared}, datalist, TINY_CMR,
                       device="cpu", allow_random_base=True)
    adapted = build.adapted
    heads = [k for k in adapted.private_keys if adapted.policy.is_head_key(k)]
    assert heads, "the head is private for this method"
    initial = {k: v.clone() for k, v in adapted.net.state_dict().items() if k in heads}
    build.trainer.train_round(epochs=3)
    trained = adapted.net.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in heads)  # the site trained its private head
    paths = export_site_bundles(build, tmp_path / "export", "site-x")
    exported = torch.load(paths["global"] / "models" / "model.pt", map_location="cpu", weights_only=True)
    plain = {k.replace(".base_layer.", "."): k for k in heads}
    for plain_key, key in plain.items():  # the global-only export carries the head as received, not the trained one
        assert torch.equal(exported[plain_key], initial[key]), plain_key
    meta = json.loads((paths["global"] / "configs" / "metadata.json").read_text())["trained_weights"]
    assert "head" in meta["global_only"]["private_left_out"] and "NOT" in meta["what"]
    assert "federation's global model" not in meta["what"]
    # the global-only metrics come from the same model: base + shared parts + the head as received
    batch = torch.cat([b["image"] for b in build.trainer.val_loader])
    with adapted.private_adapters_disabled():
        with torch.no_grad():
            out = adapted.net.eval()(batch)
        global_only = torch.softmax(out[0] if isinstance(out, tuple) else out, 1)
    net = load_bundle_network(paths["global"]).eval()
    with torch.no_grad():
        out = net(batch)
    assert torch.allclose(torch.softmax(out[0] if isinstance(out, tuple) else out, 1), global_only, atol=1e-5)
    assert all(torch.equal(trained[k], adapted.net.state_dict()[k]) for k in heads)  # the private head is back


def test_m4_the_filter_builds_where_results_leave_and_checks_them_on_the_server():
    """A privacy scope installs the filter among the server's "in" result filters too (the simulator applies scopes
    there only): FLARE's routing headers (task id, cookies) must survive, so nothing is rebuilt, but a result that
    carries keys the scope's rule does not share is blocked."""
    from nvflare.apis.fl_constant import FilterKey, FLContextKey

    shareable = honest_train_result().to_shareable()
    shareable.set_header(ReservedHeaderKey.TASK_ID, "t-1")
    ctx = FLContext()
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.IN, private=True, sticky=False)
    with pytest.raises(ContentBlockedException, match="blocked a WEIGHTS result carrying 1 key"):
        PrivateKeyFilter(DUAL).process(shareable, ctx)  # it holds the private L
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.OUT, private=True, sticky=False)
    out = PrivateKeyFilter(DUAL).process(shareable, ctx)
    assert out.get_header(ReservedHeaderKey.TASK_ID) is None and L not in from_shareable(out).data
    out.set_header(ReservedHeaderKey.TASK_ID, "t-1")
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.IN, private=True, sticky=False)
    assert PrivateKeyFilter(DUAL).process(out, ctx) is out and out.get_header(ReservedHeaderKey.TASK_ID) == "t-1"


@pytest.mark.parametrize("weight", [10 ** 400, float("nan"), True, b"10", [10]])
def test_m6_a_hostile_weight_is_a_rejection_not_an_overflow(weight):
    agg = SharedKeyAggregator(DUAL, schema={G: [4, 8]})
    agg.reset_stats()
    agg.set_global(None, 0)
    assert agg.accept_model(model("s1", arrays(G)))
    assert not agg.accept_model(model("s2", arrays(G), n=weight))
    assert "s2" in agg._round["rejected"]
    out = agg.aggregate_model()
    assert out.meta["aggregation"]["accepted"] == {"s1": 1.0}
