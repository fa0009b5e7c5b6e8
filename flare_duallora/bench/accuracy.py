"""The accuracy benchmark: a protocol that can decide between methods, with the statistics the papers use.

For each task (synthetic vendor-shift cine CMR, 4 vendor sites in ACDC + M&Ms proportions; synthetic Fed-ISIC2019,
6 centres with its per-centre counts and label skew), each seed (the split, the initialisation and the data order),
each method of the registry and each learning rate of a small grid:

1. a federated run with the recipe's own executor, filter and aggregator in one process
   (:func:`~flare_duallora.bench.federation.run_in_process`, equal to the simulator to 1e-6);
2. every site's personalised and global-only model evaluated on the site's validation split (the final ``validate``
   task) and on its held-out test split (never seen by training or selection).

Two references run beside: **centralised** (one LoRA model trained on the pooled training data of all sites,
evaluated on every site) and **linear probe** (the registry's ``linear`` method: the frozen backbone with a head
trained on each site). Each method's learning rate is chosen on validation (mean balanced accuracy over sites and
seeds of its main model); results are reported on test at that rate: the mean over sites per seed, then mean and 95 %
confidence interval (t) over seeds, and a paired Wilcoxon signed-rank test over (site, seed) pairs of every method's
main model against Med-DualLoRA's personalised model.  A method's *main* model is its personalised model when it keeps
something private, else its one global model.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from flare_duallora.metrics import HEADLINE

REFERENCE = "duallora"
#: result tasks (``TaskSetup.name``) whose sites segment: their score is the mean foreground Dice, their tables show
#: Dice per structure and the 95 % Hausdorff distance
SEG_TASKS = ("cmr3d_seg",)
SEG_COLUMNS = ("dice", "dice/LV", "dice/MYO", "dice/RV", "hd95")
#: the benchmark's tasks (``--tasks``) and what prepares each
BENCH_TASKS = ("cmr", "isic", "cmrseg")
#: per benchmark task, the registry's methods that do not apply to it, and why
NOT_APPLICABLE = {"cmrseg": {"pfedst": "its side network ends in a pooled classification head"}}


def score_key(task: str) -> str:
    """The metric that selects the learning rate and the round, and that the Wilcoxon test compares."""
    return "dice" if task in SEG_TASKS else "balanced_accuracy"


def metric_keys(task: str) -> tuple:
    return SEG_COLUMNS if task in SEG_TASKS else HEADLINE


def _score(row: dict):
    return row.get("score", row.get("balanced_accuracy"))


def _prepare(task: str):
    from flare_duallora.synthetic_tasks import prepare_cmr, prepare_cmr_segmentation, prepare_isic

    return {"cmr": prepare_cmr, "isic": prepare_isic, "cmrseg": prepare_cmr_segmentation}[task]
CENTRALISED = "centralised"
# bench accuracy --privacy: these methods at each target epsilon of the protocol (and without DP), delta 1e-5, clip 1
PRIVACY_METHODS = ("duallora", "fedsa", "fedit", "local")
DP_DELTA, DP_CLIP = 1e-5, 1.0
DP_TAG = "+dp"


def base_method(label: str) -> str:
    """``duallora+dp3`` (Med-DualLoRA at target epsilon 3) -> ``duallora``."""
    return label.split(DP_TAG)[0]


def dp_label(method: str, epsilon: Optional[float]) -> str:
    return method if epsilon is None else f"{method}{DP_TAG}{epsilon:g}"


@dataclass(frozen=True)
class Protocol:
    """One benchmark size: the task preset, seeds, the learning-rate grid, rounds and local epochs."""

    data: str
    seeds: int
    lrs: tuple
    rounds: int
    local_epochs: int
    tasks: tuple = ("cmr", "isic")
    epsilons: tuple = (1.0, 3.0, 8.0)  # --privacy: the target budgets
    privacy_lrs: tuple = ()  # --privacy: the rate grid of every run of the privacy comparison (empty: lrs)
    adapter: tuple = ()  # adapter settings every run of this protocol sets on top of the task's ((name, value), ...)


PRESETS = {
    "tiny": Protocol(data="tiny", seeds=2, lrs=(1e-2,), rounds=2, local_epochs=1),
    # --privacy: DP-SGD's clipped, noised steps need the larger rates; two rates for every level (with and without DP)
    # keep the 320 runs of the comparison within about 75 minutes on 2 CPU cores
    "medium": Protocol(data="medium", seeds=5, lrs=(3e-3, 1e-2, 3e-2), rounds=5, local_epochs=3,
                       privacy_lrs=(1e-2, 3e-2)),
    "full": Protocol(data="full", seeds=5, lrs=(1e-3, 3e-3, 1e-2), rounds=20, local_epochs=2),
}


#: segmentation's own protocol where it differs (``bench accuracy --tasks cmrseg``): a 3D decoder on every voxel, with
#: sliding-window validation and Hausdorff distances, costs about 15 classification runs on the CPU, so the medium
#: protocol is shortened (2 rounds x 2 local epochs, two rates) to fit about 40 minutes on 2 cores
TASK_PRESETS = {
    "cmrseg": {"medium": Protocol(data="medium", seeds=5, lrs=(1e-2, 3e-2), rounds=2, local_epochs=2,
                                  tasks=("cmrseg",))},
}


def protocol_for(task: str, setting: str, base: Protocol) -> Protocol:
    """The protocol ``task`` runs under at ``setting``: its own (:data:`TASK_PRESETS`) where it has one, with the
    adapter settings and epsilons of ``base``; else ``base``."""
    from dataclasses import replace

    own = TASK_PRESETS.get(task, {}).get(setting)
    return replace(own, adapter=base.adapter, epsilons=base.epsilons) if own is not None else base


def main_model(method: str) -> str:
    """``personalised`` for methods that keep something at home, else ``single`` (one model for everyone)."""
    from flare_duallora.engine import get_method

    if method == CENTRALISED:
        return "single"
    return "personalised" if get_method(base_method(method)).personalised else "single"


def _models(method: str, metrics: dict) -> dict:
    """``{model kind: metrics}`` as reported: one model for single-model methods; only the personalised model for
    methods without private adapters (their global-only model is the personalised one) and for methods whose adapters
    share nothing (local-only: its "global-only" model would be the site's base and head, nothing federated)."""
    from flare_duallora.engine import get_method
    from flare_duallora.engine.methods import SHARED

    if main_model(method) == "single":
        return {"single": metrics["personalised"]}
    spec = get_method(base_method(method))
    shares_adapters = spec.extra_roles is not None or (
        spec.lora_rule is not None and any(spec.lora_rule(f, a) == SHARED for a in spec.adapters for f in "AB"))
    if not spec.adapters or not shares_adapters:
        return {"personalised": metrics["personalised"]}
    return {"personalised": metrics["personalised"], "global_only": metrics["global_only"]}


# ---------------------------------------------------------------------------------------------- evaluation data
class SplitLoaders:
    """Validation and test loaders of every site of one split (built once, reused by every method and rate)."""

    def __init__(self, setup, datalists: Path, scratch: Optional[Path] = None):
        self.setup = setup
        self.datalists = datalists
        self.scratch = scratch or datalists  # where the test-as-validation datalist copies go (one run's folder)
        self._cache: dict = {}

    def loader(self, site: str, split: str):
        key = (site, split)
        if key not in self._cache:
            from flare_duallora.bundle import BundleRuntime
            from flare_duallora.training.site import make_loader

            info = json.loads((self.datalists / f"{site}.json").read_text())
            if split == "test":  # the bundle reads 'validation': a copy of the datalist whose validation is the test
                info = {**info, "validation": info["test"]}
                self.scratch.mkdir(parents=True, exist_ok=True)
                path = self.scratch / f".{site}.test.json"
                path.write_text(json.dumps(info))
            else:
                path = self.datalists / f"{site}.json"
            runtime = BundleRuntime(self.setup.bundle, overrides={**self.setup.overrides, "datalist": str(path)})
            self._cache[key] = make_loader(runtime.val_dataset, runtime.val_batch_size, False)
        return self._cache[key]


# ---------------------------------------------------------------------------------------------- runs
#: which round's model a row shows: the last round's, or the round the site's own validation selects (per model)
PICKS = ("last", "val_selected")


def _rows(task, method, lr, seed, site, split, metrics, cache: Optional[bool] = None, pick: str = "last",
          rounds: Optional[dict] = None) -> list[dict]:
    return [{"task": task, "method": method, "lr": lr, "seed": seed, "site": site, "model": kind, "split": split,
             "pick": pick, "round": (rounds or {}).get(kind), "score": m.get(score_key(task)),
             **{k: m.get(k) for k in metric_keys(task)}, "n": m.get("n"),
             **({"hd95_unit": m["hd95_unit"]} if "hd95_unit" in m else {}),
             "prefix_cache": cache} for kind, m in _models(method, metrics).items()]


def _changing_state(net) -> dict:
    """A copy of what training changes: the trainable parameters and the buffers (not the frozen base, which stays
    as it is, so loading the copy back leaves a frozen-prefix cache valid)."""
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in net.named_buffers()}
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k in trainable or k in buffers}


class RoundPicker:
    """Keeps, per site and model (personalised, global-only), the weights of the round whose *validation* score
    (``key``: balanced accuracy, or Dice for segmentation) is best (the earliest on ties), fed by
    :func:`~flare_duallora.bench.federation.run_in_process`'s ``on_round``.  It sees validation metrics only; the
    test split is evaluated after the run."""

    KINDS = ("personalised", "global_only")

    def __init__(self, key: str = "balanced_accuracy"):
        self.key = key
        self.best: dict = {}  # (site, kind) -> (score, round index, validation metrics, weights)

    def __call__(self, rnd: int, site: str, metrics: dict, build) -> None:
        weights = None
        for kind in self.KINDS:
            score = (metrics.get(kind) or {}).get(self.key)
            if score is None or (isinstance(score, float) and math.isnan(score)):
                continue
            best = self.best.get((site, kind))
            if best is None or score > best[0] + 1e-12:
                if weights is None:
                    weights = _changing_state(build.trainer.adapted.net)
                self.best[(site, kind)] = (score, rnd, metrics[kind], weights)

    def evaluate(self, site: str, trainer, loader, final_test: Optional[dict] = None) -> tuple[dict, dict, dict]:
        """``(validation metrics, test metrics, 1-based rounds)`` per model at each model's selected round (the
        network is left holding the last selected weights).  ``final_test``: the test metrics of the network as it
        is now, reused for a model whose selected weights are exactly the present ones (no second evaluation)."""
        val, test, rounds = {}, {}, {}
        net = trainer.adapted.net
        kinds = [k for k in self.KINDS if (site, k) in self.best]
        final = {k for k in kinds if final_test is not None and k in final_test and _holds(net, self.best[(site, k)][3])}
        for kind in kinds:
            _, rnd, metrics, weights = self.best[(site, kind)]
            val[kind], rounds[kind] = metrics, rnd + 1
            if kind in final:  # decided before any weights were loaded
                test[kind] = final_test[kind]
                continue
            net.load_state_dict(weights, strict=False)  # the frozen base is the same
            test[kind] = trainer.evaluate(loader=loader, kinds=(kind,))[kind]
        return val, test, rounds


def _holds(net, weights: dict) -> bool:
    """Whether ``net`` holds exactly ``weights`` (every tensor equal, bit for bit)."""
    state = net.state_dict()
    return all(k in state and _equal(state[k], v) for k, v in weights.items())


def _equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _cache_used(records: list[dict]) -> Optional[bool]:
    """Whether the site trained on the frozen-prefix cache (cached and recomputed training differ in the last
    bits), from its executor records; reported per run so that a changed decision is visible."""
    return next((bool(r.get("enabled")) for r in records if r.get("event") == "prefix_cache"), None)


def run_federated(setup, datalists: Path, loaders: SplitLoaders, method: str, lr: float, seed: int,
                  protocol: Protocol, workdir: Path, epsilon: Optional[float] = None) -> list[dict]:
    """One federated run; with ``epsilon`` every site trains with DP-SGD to that target (rows labelled
    ``<method>+dp<epsilon>``, with the epsilon each site spent)."""
    from flare_duallora.bench.federation import run_in_process
    from flare_duallora.deploy.recipe import DualLoRARecipe

    settings = {**setup.adapter, **dict(protocol.adapter), "method": method, "seed": seed}
    recipe = DualLoRARecipe(
        name=f"{setup.name}_{method}", target="sim", bundle_root=str(setup.bundle), settings=settings,
        clients=setup.sites, datalist_dir=str(datalists), num_rounds=protocol.rounds,
        local_epochs=protocol.local_epochs, bundle_overrides={**setup.overrides, "learning_rate": lr}, seed=seed,
        device="auto", export_bundles=False, prefix_cache="auto",
        differential_privacy=None if epsilon is None else {"epsilon": epsilon, "delta": DP_DELTA,
                                                           "max_grad_norm": DP_CLIP})
    picker = RoundPicker(score_key(setup.name))
    out = run_in_process(recipe, workdir, on_round=picker)
    if not out.ok:
        raise RuntimeError(f"{setup.name} {method} lr {lr} seed {seed}: the run failed: {out.failures}")
    rows = []
    label = dp_label(method, epsilon)
    last = {k: len(out.rounds) for k in RoundPicker.KINDS}
    for site in setup.sites:  # the run is over: only now is any test split read
        cache = _cache_used(out.records.get(site, []))
        trainer = out.sites[site].trainer
        last_test = trainer.evaluate(loader=loaders.loader(site, "test"))
        site_rows = _rows(setup.name, label, lr, seed, site, "val", out.site_results[site], cache, "last", last)
        site_rows += _rows(setup.name, label, lr, seed, site, "test", last_test, cache, "last", last)
        val, test, rounds = picker.evaluate(site, trainer, loaders.loader(site, "test"), final_test=last_test)
        for kind in set(RoundPicker.KINDS) - set(val):  # never a defined validation score: the last round
            val[kind], test[kind], rounds[kind] = out.site_results[site][kind], last_test[kind], last[kind]
        site_rows += _rows(setup.name, label, lr, seed, site, "val", val, cache, "val_selected", rounds)
        site_rows += _rows(setup.name, label, lr, seed, site, "test", test, cache, "val_selected", rounds)
        if epsilon is not None:
            spent = out.site_results[site].get("privacy") or {}
            for row in site_rows:
                row.update(target_epsilon=epsilon, epsilon=spent.get("epsilon"))
        rows += site_rows
    return rows


def run_centralised(setup, datalists: Path, loaders: SplitLoaders, lr: float, seed: int, protocol: Protocol,
                    workdir: Path) -> list[dict]:
    """One LoRA model (FedIT's settings) trained on the pooled training data for rounds x local epochs epochs."""
    from flare_duallora.training.from_bundle import build_site
    from flare_duallora.training.pretrain import pooled_datalist

    workdir.mkdir(parents=True, exist_ok=True)
    pooled = pooled_datalist([datalists / f"{s}.json" for s in setup.sites], workdir / "pooled.json")
    build = build_site(setup.bundle, {**setup.adapter, "method": "fedit", "seed": seed}, pooled,
                       {**setup.overrides, "learning_rate": lr}, device="auto", seed=seed)
    build.trainer.train_round(epochs=protocol.rounds * protocol.local_epochs)
    rows = []
    final = {"personalised": 1}  # trained in one go: its final model is both picks
    for site in setup.sites:
        for split in ("val", "test"):
            metrics = build.trainer.evaluate(loader=loaders.loader(site, split), kinds=("personalised",))
            for pick in PICKS:
                rows += _rows(setup.name, CENTRALISED, lr, seed, site, split, metrics, False, pick, final)
    return rows


# ---------------------------------------------------------------------------------------------- statistics
def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df)) if df > 0 else float("nan")


def choose_rates(rows: list[dict]) -> dict:
    """``{(task, method): lr}``: the rate whose main model has the best mean validation score (balanced accuracy;
    Dice for segmentation)."""
    scores: dict = {}
    for r in rows:
        if r["split"] == "val" and r.get("pick", "last") == "last" and r["model"] == main_model(r["method"]) \
                and _score(r) is not None:
            scores.setdefault((r["task"], r["method"], r["lr"]), []).append(_score(r))
    best: dict = {}
    for (task, method, lr), vals in sorted(scores.items(), key=lambda kv: kv[0][2]):
        mean = float(np.mean(vals))
        if (task, method) not in best or mean > best[(task, method)][1] + 1e-12:
            best[(task, method)] = (lr, mean)
    return {k: v[0] for k, v in best.items()}


def summarise(rows: list[dict], rates: dict, pick: str = "last") -> list[dict]:
    """Test results at the chosen rate of the ``pick`` models (:data:`PICKS`): mean over sites per seed, then mean
    and 95 % CI over seeds per metric, and the paired Wilcoxon test over (site, seed) against Med-DualLoRA's
    personalised model."""
    from scipy.stats import wilcoxon

    test = [r for r in rows if r["split"] == "test" and rates.get((r["task"], r["method"])) == r["lr"]
            and r.get("pick", "last") == pick]
    out = []
    groups: dict = {}
    for r in test:
        groups.setdefault((r["task"], r["method"], r["model"]), []).append(r)
    for (task, method, model), rs in sorted(groups.items()):
        row = {"task": task, "method": method, "model": model, "pick": pick, "lr": rates[(task, method)],
               "seeds": len({r["seed"] for r in rs}), "sites": len({r["site"] for r in rs})}
        for k in metric_keys(task):
            per_seed = {}
            for r in rs:
                if r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k])):
                    per_seed.setdefault(r["seed"], []).append(r[k])
            vals = np.array([np.mean(v) for v in per_seed.values()])
            row[k] = float(vals.mean()) if len(vals) else None
            row[f"{k}_ci95"] = float(_t975(len(vals) - 1) * vals.std(ddof=1) / math.sqrt(len(vals))) \
                if len(vals) > 1 else None
        row["p_vs_duallora"] = None
        if method != REFERENCE and model == main_model(method):
            ref = {(r["site"], r["seed"]): _score(r) for r in test
                   if r["task"] == task and r["method"] == REFERENCE and r["model"] == "personalised"}
            mine = {(r["site"], r["seed"]): _score(r) for r in rs}
            pairs = [(mine[k], ref[k]) for k in sorted(set(mine) & set(ref))
                     if mine[k] is not None and ref[k] is not None]
            if pairs:
                a, b = np.array(pairs).T
                diff = a - b
                row["p_vs_duallora"] = 1.0 if not np.any(diff) else float(wilcoxon(a, b).pvalue)
                row["pairs"] = len(pairs)
                row["mean_diff_vs_duallora"] = float(diff.mean())
        row["score"] = row[score_key(task)]
        out.append(row)
    return out


def per_site(rows: list[dict], rates: dict, pick: str = "last") -> list[dict]:
    """Mean test score (balanced accuracy; Dice for segmentation) and metrics per task, site and method (main model),
    over seeds: where a method wins."""
    cells: dict = {}
    for r in rows:
        if r["split"] == "test" and rates.get((r["task"], r["method"])) == r["lr"] and \
                r.get("pick", "last") == pick and \
                r["model"] == main_model(r["method"]) and _score(r) is not None:
            cells.setdefault((r["task"], r["site"], r["method"]), []).append(r)
    out = []
    for (task, site, method), rs in sorted(cells.items()):
        keys = dict.fromkeys((*metric_keys(task), score_key(task)))
        cell = {"task": task, "site": site, "method": method,
                **{k: float(np.nanmean([r.get(k) if r.get(k) is not None else np.nan for r in rs])) for k in keys},
                "n_test": rs[0]["n"]}
        cell["score"] = cell[score_key(task)]
        out.append(cell)
    return out


# ---------------------------------------------------------------------------------------------- protocol
_SETUPS: dict = {}  # per worker: task -> its TaskSetup (files on disk, read-only after the main process wrote them)

#: torch threads of every run, whatever the worker or the caller set: float reductions depend on the thread count
RUN_THREADS = 1


def isolate_run(seed: int) -> None:
    """Put the process-wide state a run can read into the same state before every run, so that a run's numbers do
    not depend on which worker runs it, in which order, or after which other run: the global RNGs of torch, numpy
    and Python are reseeded from the run's seed and the torch thread count is fixed (:data:`RUN_THREADS`)."""
    import random

    import torch

    torch.set_num_threads(RUN_THREADS)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(RUN_THREADS)  # one process per core: small ViTs run faster than with threads fighting


def _run_one(job: tuple) -> list[dict]:
    """One (task, seed, method, rate) run in a worker process.  Only the task set-up (paths) is kept between runs
    in a worker; evaluation loaders are built per run and the process state is reset (:func:`isolate_run`)."""
    task, data, work, seed, method, lr, protocol, epsilon, *rest = job
    shift = rest[0] if rest else None  # the heterogeneity knobs of a map cell (None: today's cohort)
    key = task + _shift_key(shift)
    if key not in _SETUPS:
        prepare = _prepare(task)
        _SETUPS[key] = prepare(work, preset=data, seed=0, log=lambda *_: None, **({"shift": shift} if shift else {}))
    setup = _SETUPS[key]
    datalists = work / "splits" / f"{key}_seed{seed}"
    isolate_run(seed)
    run_dir = work / "runs" / f"{key}_{method}_{lr}_{seed}"
    loaders = SplitLoaders(setup, datalists, scratch=run_dir / "eval")
    if method == CENTRALISED:
        rows = run_centralised(setup, datalists, loaders, lr, seed, protocol, run_dir)
    else:
        if epsilon is not None:
            run_dir = run_dir.with_name(f"{run_dir.name}_dp{epsilon:g}")
        rows = run_federated(setup, datalists, loaders, method, lr, seed, protocol, run_dir, epsilon)
    for r in rows:
        r.update(shift or {})
    return rows


def _shift_key(shift: Optional[dict]) -> str:
    from flare_duallora.synthetic_tasks import shift_label

    return shift_label(shift)


def run_jobs(jobs: list[tuple], workers: int, log: Callable[[str], None] = print) -> list[dict]:
    """Run ``jobs`` (:func:`_run_one` tuples) in ``workers`` spawned processes; their rows, in completion order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    t0 = time.perf_counter()
    rows: list[dict] = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(_run_one, job): job for job in jobs}
        for i, future in enumerate(as_completed(futures), 1):
            rows += future.result()
            if i % max(1, len(jobs) // 20) == 0 or i == len(jobs):
                log(f"  {i}/{len(jobs)} runs done ({time.perf_counter() - t0:.0f} s)")
    return rows


def run_protocol(setting: str, out_dir: str | Path, methods: Optional[Sequence[str]] = None,
                 tasks: Optional[Sequence[str]] = None, seeds: Optional[int] = None, machine: str = "",
                 workers: Optional[int] = None, log: Callable[[str], None] = print, command: str = "",
                 privacy: bool = False, epsilons: Optional[Sequence[float]] = None,
                 adapter: Optional[dict] = None, centralised: bool = True) -> dict:
    """Run the protocol (see the module docstring) and write its tables, plot and report into ``out_dir``.

    ``adapter``: adapter settings every run sets on top of the task's (e.g. ``{"orth_gradient": "joint"}`` to
    compare a method's variant at the same commit); ``centralised``: also run the centralised reference.

    ``privacy``: also run each method (default :data:`PRIVACY_METHODS`) with DP-SGD at every target epsilon of the
    protocol (rows ``<method>+dp<epsilon>``, beside the same method without DP).

    The runs go to ``workers`` processes (default: one per CPU core); each run starts from the same process state
    (:func:`isolate_run`), so its numbers do not depend on the worker, the order or the other runs.  The report
    records the commit of the code and ``command`` (the command line that asked for it)."""
    from flare_duallora.bench.machine import provenance

    if setting not in PRESETS:
        raise ValueError(f"accuracy benchmark: unknown setting {setting!r}; expected one of {sorted(PRESETS)}")
    import os

    from flare_duallora.engine import method_names

    from dataclasses import replace

    protocol = PRESETS[setting]
    code = provenance()  # the code the runs import: read now, not when the report is written
    if adapter:
        from flare_duallora.engine import AdapterSettings

        AdapterSettings.from_dict({k: v for k, v in adapter.items()})  # a bad setting is named before any run
        protocol = replace(protocol, adapter=tuple(sorted(adapter.items())))
    out = Path(out_dir).resolve()
    work = out / "work"
    methods = list(methods or (PRIVACY_METHODS if privacy else method_names()))
    epsilons = [None, *(epsilons or protocol.epsilons)] if privacy else [None]
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)
    tasks = list(tasks or protocol.tasks)
    n_seeds = seeds or protocol.seeds
    timings = {}
    start = time.perf_counter()
    jobs = []
    if privacy and protocol.privacy_lrs:
        protocol = replace(protocol, lrs=protocol.privacy_lrs)
    protocols = {task: protocol_for(task, setting, protocol) for task in tasks}
    for task in tasks:
        t0 = time.perf_counter()
        own = protocols[task]
        setup = _prepare(task)(work, preset=own.data, seed=0, log=log)
        for seed in range(n_seeds):
            setup.resplit(seed, work / "splits" / f"{task}_seed{seed}")
        timings[f"{task}: data + pretraining"] = time.perf_counter() - t0
        jobs += [(task, own.data, work, seed, method, lr, own, eps)
                 for seed in range(n_seeds) for method in [*methods, *([CENTRALISED] if centralised else [])]
                 for lr in own.lrs
                 for eps in (epsilons if method != CENTRALISED else [None])
                 if base_method(method) not in NOT_APPLICABLE.get(task, {})]
        for method, why in NOT_APPLICABLE.get(task, {}).items():
            if method in methods:
                log(f"{task}: {method} left out ({why})")
    workers = workers or os.cpu_count() or 1
    log(f"{len(jobs)} runs ({len(tasks)} task(s) x {n_seeds} seeds x {len(methods) + 1} methods"
        f"{f' (x {len(epsilons)} privacy levels)' if privacy else ''} x "
        f"{'/'.join(str(len(protocols[t].lrs)) for t in tasks)} rates) in {workers} process(es)")
    t0 = time.perf_counter()
    rows = run_jobs(jobs, workers, log)
    timings["federated runs and references"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    rows.sort(key=lambda r: (r["task"], r["method"], r["lr"], r["seed"], r["site"], r["model"], r["pick"],
                             r["split"]))
    rates = choose_rates(rows)
    summary = [s for pick in PICKS for s in summarise(rows, rates, pick)]
    sites = per_site(rows, rates)
    return write_outputs(rows, summary, sites, rates, out, setting, protocol, n_seeds, timings, machine,
                         provenance=code, command=command,
                         own_protocols={t: p for t, p in protocols.items() if p != protocol})


# ---------------------------------------------------------------------------------------------- outputs
def _title(method: str) -> str:
    from flare_duallora.engine import get_method

    if method == CENTRALISED:
        return "Centralised (pooled LoRA)"
    name = get_method(base_method(method)).display_name
    return name if method == base_method(method) else f"{name}, DP epsilon = {method.split(DP_TAG)[1]}"


def _fmt(value, ci=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" + (f" ± {ci:.3f}" if ci is not None and not math.isnan(ci) else "")


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


#: column titles of the summary tables
COLUMN_TITLES = {"balanced_accuracy": "balanced acc.", "sensitivity": "sensitivity", "specificity": "specificity",
                 "mcc": "MCC", "auc": "AUC", "dice": "Dice", "dice/LV": "Dice LV", "dice/MYO": "Dice MYO",
                 "dice/RV": "Dice RV", "hd95": "HD95 (mm)"}
TASK_TITLES = {"cmr3d": "synthetic vendor-shift cine CMR (3D, 4 vendor sites, disease vs normal)",
               "cmr3d_seg": "synthetic vendor-shift cine CMR segmentation (3D ED and ES frames, 4 vendor sites, "
                            "LV / MYO / RV)",
               "isic": "synthetic Fed-ISIC2019 (2D, 6 centres, 8 lesion classes)"}


def write_outputs(rows, summary, sites, rates, out: Path, setting: str, protocol: Protocol, n_seeds: int,
                  timings: dict, machine: str, provenance: Optional[dict] = None, command: str = "",
                  own_protocols: Optional[dict] = None) -> dict:
    from flare_duallora.bench.machine import provenance_line

    out.mkdir(parents=True, exist_ok=True)
    paths = {"rows": out / "accuracy_runs.csv", "summary": out / "accuracy_summary.csv",
             "sites": out / "accuracy_per_site.csv", "report": out / "accuracy_report.md", "plot": out / "accuracy.png"}
    _write_csv(paths["rows"], rows)
    _write_csv(paths["summary"], summary)
    _write_csv(paths["sites"], sites)
    lines = [f"# Accuracy benchmark (`{setting}`)", "", f"Machine: {machine}", "",
             f"Commit: {provenance_line(provenance or {'commit': 'unknown'})}", "",
             f"Command: `{command or 'run_protocol(' + repr(setting) + ')'}`", "",
             f"Protocol: {n_seeds} seeds; learning rate chosen per method from {list(protocol.lrs)} on validation; "
             f"{protocol.rounds} rounds x {protocol.local_epochs} local epoch(s); results on each site's held-out test "
             f"split: mean over sites per seed, then mean ± 95 % CI (t) over seeds; p: paired Wilcoxon signed-rank "
             f"test over (site, seed) of the method's main model against Med-DualLoRA's personalised model "
             f"(balanced accuracy; mean foreground Dice for segmentation tasks, whose rate and round are chosen on "
             f"validation Dice).", "",
             *[line for t, p in sorted((own_protocols or {}).items()) for line in (
                 f"Task `{t}` runs a protocol of its own: learning rate from {list(p.lrs)} on validation, {p.rounds} "
                 f"rounds x {p.local_epochs} local epoch(s) (a 3D decoder on every voxel costs about 20 "
                 f"classification runs on the CPU).", "")],
             "Measured time: " + "; ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()), ""]
    titles = dict(COLUMN_TITLES)
    if any(str(r.get("hd95_unit")) == "0" for r in rows):  # some volumes carried no affine: distances in voxels
        titles["hd95"] = "HD95 (voxels)"
    shown = {"last": "the model after the last round (what a federation hands over when it ends)",
             "val_selected": "for each site and each model (personalised, global-only) separately, the round its own "
                             "validation split selects (best balanced accuracy, or Dice, earliest on ties); the test split is "
                             "read only after the run. The centralised reference trains in one go: its final model"}
    last_summary = [s for s in summary if s.get("pick", "last") == "last"]
    for task in sorted({s["task"] for s in summary}):
        lines += [f"## {TASK_TITLES.get(task, task)}", ""]
        for pick in PICKS:
            rows_ = [s for s in summary if s["task"] == task and s.get("pick", "last") == pick]
            if not rows_:
                continue
            keys, score = metric_keys(task), score_key(task)
            lines += [f"Shown: {shown[pick]}.", "",
                      "| method | model | lr | " + " | ".join(titles.get(k, k) for k in keys)
                      + " | p vs Med-DualLoRA |",
                      "|---|---|---|" + "---|" * (len(keys) + 1)]
            for s in rows_:
                p = s.get("p_vs_duallora")
                lines.append(f"| {_title(s['method'])} | {s['model'].replace('_', '-')} | {s['lr']:g} | "
                             + " | ".join(_fmt(s.get(k), s.get(f"{k}_ci95") if k == score else None) for k in keys)
                             + f" | {'-' if p is None else f'{p:.3g}'} |")
            lines.append("")
        what = "balanced accuracy" if score_key(task) == "balanced_accuracy" else "Dice"
        lines += [f"Per site (last round; test {what} of each method's main model, mean over seeds):", ""]
        task_sites = sorted({c["site"] for c in sites if c["task"] == task})
        task_methods = [m for m in dict.fromkeys(c["method"] for c in sites if c["task"] == task)]
        lines.append("| method | " + " | ".join(task_sites) + " |")
        lines.append("|---|" + "---|" * len(task_sites))
        for m in task_methods:
            cells = {c["site"]: c for c in sites if c["task"] == task and c["method"] == m}
            lines.append(f"| {_title(m)} | " + " | ".join(_fmt(cells[x]["score"]) if x in cells else "-"
                                                          for x in task_sites) + " |")
        n_test = {c["site"]: c["n_test"] for c in sites if c["task"] == task}
        unit = "Test frames (ED and ES of each test subject)" if task in SEG_TASKS else "Test subjects"
        lines += ["", f"{unit} per site: " + ", ".join(f"{k} {v}" for k, v in sorted(n_test.items())), ""]
        lines += _where(task, last_summary, sites)
    if any(DP_TAG in s["method"] for s in last_summary):
        paths["privacy_plot"] = out / "privacy.png"
        lines += privacy_section(last_summary, rows, rates)
        plot_privacy(last_summary, paths["privacy_plot"], setting)
    paths["report"].write_text("\n".join(lines) + "\n")
    plot(last_summary, paths["plot"], setting)
    return paths


def _privacy_levels(summary: list[dict], task: str) -> tuple[list[str], list[Optional[float]]]:
    """The methods that ran with DP on ``task`` and the target epsilons (``None``: without DP), in order."""
    methods = list(dict.fromkeys(base_method(s["method"]) for s in summary if s["task"] == task
                                 and DP_TAG in s["method"]))
    eps = sorted({float(s["method"].split(DP_TAG)[1]) for s in summary if s["task"] == task and DP_TAG in s["method"]})
    return methods, [*eps, None]


def _main_row(summary: list[dict], task: str, method: str) -> Optional[dict]:
    """``method``'s summary row on ``task`` for its main model (None: it did not run there)."""
    return next((x for x in summary if x["task"] == task and x["method"] == method
                 and x["model"] == main_model(method)), None)


def privacy_section(summary: list[dict], rows: list[dict], rates: dict) -> list[str]:
    """Per task: each DP method's main model at every target epsilon and without DP (mean ± 95 % CI over seeds, the
    model after the last round), and the largest epsilon any site spent."""
    lines = ["## Accuracy under differential privacy", "",
             f"DP-SGD at every site (Poisson sampling, per-example clipping at norm {DP_CLIP:g}, Gaussian noise "
             f"calibrated once for the whole job, RDP accountant, delta {DP_DELTA:g}); every trained parameter is "
             f"private (global and local adapters, head); unit: one datalist item. Each cell: test score of the "
             f"method's main model after the last round, at the learning rate chosen on validation for that method "
             f"and budget; spent: the largest epsilon any site of any seed spent (never above the target).", ""]
    for task in sorted({s["task"] for s in summary}):
        methods, levels = _privacy_levels(summary, task)
        if not methods:
            continue
        what = "balanced accuracy" if score_key(task) == "balanced_accuracy" else "Dice"
        heads = [f"epsilon = {e:g}" if e is not None else "no DP" for e in levels]
        lines += [f"### {TASK_TITLES.get(task, task)} (test {what})", "",
                  "| method | " + " | ".join(heads) + " | spent (largest) |", "|---|" + "---|" * (len(heads) + 1)]
        for m in methods:
            cells, spent = [], []
            for e in levels:
                label = dp_label(m, e)
                s = _main_row(summary, task, label)
                key = score_key(task)
                cells.append(_fmt(s.get(key), s.get(f"{key}_ci95")) if s else "-")
                if e is not None:
                    vals = [r["epsilon"] for r in rows if r["task"] == task and r["method"] == label
                            and r.get("epsilon") is not None and rates.get((task, label)) == r["lr"]]
                    spent.append(f"{max(vals):.2f} / {e:g}" if vals else "-")
            lines.append(f"| {_title(m)} | " + " | ".join(cells) + " | " + ", ".join(spent) + " |")
        lines.append("")
    return lines


def plot_privacy(summary: list[dict], path: Path, setting: str) -> None:
    """Test score against the target epsilon per DP method (the point right of the axis break: without DP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary if DP_TAG in s["method"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods, levels = _privacy_levels(summary, task)
        xs = list(range(len(levels)))
        for m in methods:
            ys, errs = [], []
            for e in levels:
                s = _main_row(summary, task, dp_label(m, e))
                ys.append(_score(s) if s else float("nan"))
                errs.append((s or {}).get(f"{score_key(task)}_ci95") or 0)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=_title(m))
        ax.set_xticks(xs, [f"{e:g}" if e is not None else "no DP" for e in levels])
        ax.set_xlabel("target epsilon (delta 1e-5)")
        ax.set_ylabel(f"{'balanced accuracy' if score_key(task) == 'balanced_accuracy' else 'Dice'} (test, 95 % CI)")
        ax.set_title(f"{TASK_TITLES.get(task, task)}\nsetting {setting}, DP-SGD at every site", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _where(task: str, summary: list[dict], sites: list[dict]) -> list[str]:
    """Where Med-DualLoRA is beaten: which methods, at which sites, on which metric."""
    ref = next((s for s in summary if s["task"] == task and s["method"] == REFERENCE and s["model"] == "personalised"),
               None)
    if ref is None:
        return []
    what = "balanced accuracy" if score_key(task) == "balanced_accuracy" else "Dice"
    lines = []
    for s in summary:
        if s["task"] != task or s["method"] == REFERENCE or s["model"] != main_model(s["method"]):
            continue
        if (_score(s) or 0) <= (_score(ref) or 0):
            continue
        better = [c["site"] for c in sites if c["task"] == task and c["method"] == s["method"]
                  and _score(c) > next(_score(r) for r in sites if r["task"] == task
                                       and r["site"] == c["site"] and r["method"] == REFERENCE)]
        lower_better = ("hd95",)
        metrics = [k for k in metric_keys(task) if s.get(k) is not None and ref.get(k) is not None
                   and (s[k] < ref[k] if k in lower_better else s[k] > ref[k])]
        lines.append(f"- {_title(s['method'])} beats Med-DualLoRA on mean test {what} "
                     f"({_score(s):.3f} vs {_score(ref):.3f}, p = "
                     f"{s['p_vs_duallora'] if s['p_vs_duallora'] is not None else float('nan'):.3g}); better at "
                     f"{', '.join(better) or 'no single site'}; better on {', '.join(metrics)}.")
    return (["Where Med-DualLoRA does not win:", "", *lines, ""] if lines
            else [f"Med-DualLoRA's personalised model has the best mean test {what}.", ""])


def plot(summary: list[dict], path: Path, setting: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 4.2), squeeze=False)
    colors = {"personalised": "tab:blue", "global_only": "tab:orange", "single": "tab:gray"}
    for ax, task in zip(axes[0], tasks):
        rows = [s for s in summary if s["task"] == task]
        methods = list(dict.fromkeys(s["method"] for s in rows))
        x = 0.0
        ticks, labels = [], []
        for m in methods:
            kinds = [s for s in rows if s["method"] == m]
            width = 0.8 / len(kinds)
            for i, s in enumerate(kinds):
                ax.bar(x + (i - (len(kinds) - 1) / 2) * width, _score(s) or 0, width=width,
                       yerr=s.get(f"{score_key(task)}_ci95") or 0, capsize=3, color=colors[s["model"]],
                       label=s["model"].replace("_", "-"))
            ticks.append(x)
            labels.append(_title(m))
            x += 1.0
        if task in SEG_TASKS:  # Dice has no chance level
            ax.set_ylim(bottom=0.0, top=1.0)
        else:
            chance = 0.5 if task == "cmr3d" else 1.0 / 8
            ax.axhline(chance, color="k", linestyle="--", linewidth=1, label="chance")
            ax.set_ylim(bottom=min(0.4, chance - 0.05), top=1.0)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=35, ha="right")
        ax.set_ylabel(f"{'Dice' if task in SEG_TASKS else 'balanced accuracy'} (test, 95 % CI over seeds)")
        ax.set_title(f"{TASK_TITLES.get(task, task)}\nsetting {setting}, model after the last round", fontsize=10)
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
