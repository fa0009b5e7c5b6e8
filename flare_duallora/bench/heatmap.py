"""``bench accuracy --map``: where a private adapter pays.  A grid of synthetic CMR cohorts, concept shift (none /
moderate / strong: the share of each vendor's own disease group its sites label "normal") x feature shift (low /
high: how different the vendors look), at the benchmark's site sizes (ACDC + M&Ms proportions); in every cell the
accuracy protocol (:mod:`flare_duallora.bench.accuracy`: seeds, the learning rate chosen on validation, each site's
held-out test split, the model after the last round) runs Med-DualLoRA, FedOPAL, FedSA-LoRA, FedIT, local LoRA, the
linear probe and the centralised reference.  Each cell reports which method's main model has the best mean test
balanced accuracy, its margin over the runner-up with a 95 % CI (t over seeds of the per-seed margin), and every
method's mean; a heat map draws the winner and its margin per cell.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from flare_duallora.bench.accuracy import (
    CENTRALISED, PRESETS, Protocol, _t975, _title, _write_csv, choose_rates, main_model, run_jobs, summarise,
)

MAP_METHODS = ("duallora", "fedopal", "fedsa", "fedit", "local", "linear")  # and the centralised reference
CONCEPT = {"none": 0.0, "moderate": 0.5, "strong": 1.0}
# feature shift 1 is the default cohort (each vendor as it looks), the one the demo and the accuracy benchmark use:
# the map's cell (concept none, feature low) is that cohort, so the demo's setting is a cell of the map
FEATURE = {"low": 1.0, "high": 2.0}


@dataclass(frozen=True)
class MapGrid:
    protocol: Protocol
    concept: tuple  # concept_shift values (rows)
    feature: tuple  # feature_shift values (columns)
    # ((method, rate), ...): each method runs at this one rate in every cell instead of the protocol's grid
    rates: tuple = ()
    rates_source: str = ""


#: the rate each method (and the centralised reference) chose on validation in the medium accuracy protocol on the
#: default cohort (the map's cell concept none, feature low): docs/benchmarks/accuracy_medium_cpu, commit 4b5bec77
MEDIUM_RATES = (("duallora", 3e-3), ("fedopal", 1e-2), ("fedsa", 3e-3), ("fedit", 3e-3), ("local", 3e-3),
                ("linear", 1e-2), (CENTRALISED, 3e-3))


MAP_PRESETS = {
    "tiny": MapGrid(PRESETS["tiny"], (0.0, 1.0), (1.0,)),
    # one rate per method, the one its validation chose in the medium accuracy protocol on the default cohort: the
    # protocol's 3 rates in each of the 6 cells would be 630 runs, over the 90-minute budget on 2 CPU cores
    "medium": MapGrid(PRESETS["medium"], tuple(CONCEPT.values()), tuple(FEATURE.values()), rates=MEDIUM_RATES,
                      rates_source="chosen on validation by the medium accuracy protocol on the default cohort "
                                   "(docs/benchmarks/accuracy_medium_cpu)"),
    "full": MapGrid(PRESETS["full"], tuple(CONCEPT.values()), tuple(FEATURE.values())),
}


def cell_name(concept: float, feature: float) -> str:
    c = next((k for k, v in CONCEPT.items() if v == concept), f"{concept:g}")
    f = next((k for k, v in FEATURE.items() if v == feature), f"{feature:g}")
    return f"concept {c} ({concept:g}), feature {f} ({feature:g})"


def winners(rows: list[dict], rates: dict) -> list[dict]:
    """Per cell: the method whose main model has the best mean test balanced accuracy (last round, chosen rate),
    its margin over the runner-up (mean and 95 % CI over seeds of the per-seed difference) and every method's mean."""
    per: dict = {}
    for r in rows:
        if r["split"] != "test" or r.get("pick", "last") != "last" or r["model"] != main_model(r["method"]) \
                or rates.get((r["task"], r["method"])) != r["lr"] or r["balanced_accuracy"] is None:
            continue
        per.setdefault(r["task"], {}).setdefault(r["method"], {}).setdefault(r["seed"], []).append(
            r["balanced_accuracy"])
    out = []
    for cell, methods in sorted(per.items()):
        seeds = {m: {s: float(np.mean(v)) for s, v in by_seed.items()} for m, by_seed in methods.items()}
        means = {m: float(np.mean(list(v.values()))) for m, v in seeds.items()}
        ranked = sorted(means, key=lambda m: -means[m])
        first, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        row = {"cell": cell, "winner": first, "winner_mean": means[first], "runner_up": second}
        if second is not None:
            common = sorted(set(seeds[first]) & set(seeds[second]))
            diff = np.array([seeds[first][s] - seeds[second][s] for s in common])
            row["margin"] = float(diff.mean())
            row["margin_ci95"] = float(_t975(len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))) \
                if len(diff) > 1 else None
        row.update({f"mean_{m}": means[m] for m in ranked})
        row["concept_shift"], row["feature_shift"] = _cell_shift(rows, cell)
        out.append(row)
    return out


def _cell_shift(rows: list[dict], cell: str) -> tuple:
    r = next(r for r in rows if r["task"] == cell)
    return r.get("concept_shift"), r.get("feature_shift")


def run_map(setting: str, out_dir: str | Path, methods: Optional[Sequence[str]] = None, seeds: Optional[int] = None,
            workers: Optional[int] = None, machine: str = "", command: str = "",
            concept: Optional[Sequence[float]] = None, feature: Optional[Sequence[float]] = None,
            log: Callable[[str], None] = print) -> dict:
    """Run the map (module docstring) and write ``map_runs.csv``, ``map_summary.csv``, ``map_cells.csv``,
    ``map_report.md`` and ``map.png`` into ``out_dir``."""
    import os

    from flare_duallora.bench.machine import provenance, provenance_line
    from flare_duallora.synthetic_tasks import prepare_cmr, shift_label

    if setting not in MAP_PRESETS:
        raise ValueError(f"accuracy map: unknown setting {setting!r}; expected one of {sorted(MAP_PRESETS)}")
    grid = MAP_PRESETS[setting]
    code = provenance()  # the code the runs import: read now, not when the report is written
    protocol = grid.protocol
    out = Path(out_dir).resolve()
    work = out / "work"
    methods = list(methods or MAP_METHODS)
    n_seeds = seeds or protocol.seeds
    cells = [(c, f) for c in (concept or grid.concept) for f in (feature or grid.feature)]
    start = time.perf_counter()
    jobs = []
    for c, f in cells:
        shift = {"concept_shift": float(c), "feature_shift": float(f)}
        setup = prepare_cmr(work, preset=protocol.data, seed=0, shift=shift, log=log)
        for seed in range(n_seeds):
            setup.resplit(seed, work / "splits" / f"cmr{shift_label(shift)}_seed{seed}")
        fixed = dict(grid.rates)
        jobs += [("cmr", protocol.data, work, seed, m, lr, protocol, None, shift)  # no DP
                 for seed in range(n_seeds) for m in [*methods, CENTRALISED]
                 for lr in ((fixed[m],) if m in fixed else protocol.lrs)]
    prep = time.perf_counter() - start
    workers = workers or os.cpu_count() or 1
    log(f"{len(jobs)} runs ({len(cells)} cells x {n_seeds} seeds x {len(methods) + 1} methods x "
        f"{'one rate each' if grid.rates else f'{len(protocol.lrs)} rates'}) in {workers} process(es)")
    rows = run_jobs(jobs, workers, log)
    for r in rows:
        r["task"] = cell_name(r["concept_shift"], r["feature_shift"])
    rows.sort(key=lambda r: (r["task"], r["method"], r["lr"], r["seed"], r["site"], r["model"], r["pick"],
                             r["split"]))
    rates = choose_rates(rows)
    summary = summarise(rows, rates, "last")
    cells_out = winners(rows, rates)
    total = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    paths = {"rows": out / "map_runs.csv", "summary": out / "map_summary.csv", "cells": out / "map_cells.csv",
             "report": out / "map_report.md", "plot": out / "map.png"}
    _write_csv(paths["rows"], rows)
    _write_csv(paths["summary"], summary)
    _write_csv(paths["cells"], cells_out)
    names = [*methods, CENTRALISED]
    rates_text = (f"learning rate per method fixed in every cell, {grid.rates_source}: "
                  + ", ".join(f"{_title(m)} {lr:g}" for m, lr in grid.rates if m in names)
                  if grid.rates else f"learning rate per method and cell chosen from {list(protocol.lrs)} on validation")
    lines = [f"# Where personalisation pays: heterogeneity map (`{setting}`)", "", f"Machine: {machine}", "",
             f"Commit: {provenance_line(code)}", "",
             f"Command: `{command or 'run_map(' + repr(setting) + ')'}`", "",
             f"Synthetic CMR, 4 vendor sites at the `{protocol.data}` sizes; concept shift = share of each vendor's "
             f"own disease group its sites label normal; feature shift = how different the vendors look (1 = the "
             f"default cohort, the demo's and the accuracy benchmark's; 2 = twice as different). {n_seeds} seeds; "
             f"{rates_text}; {protocol.rounds} rounds x {protocol.local_epochs} local epoch(s); shown: each method's "
             f"main model after the last round, test balanced accuracy (mean over sites per seed, then over seeds); "
             f"margin: winner minus runner-up, 95 % CI (t) over seeds.", "",
             f"Measured time: data and pretraining {prep / 60:.1f} min; total {total / 60:.1f} min", "",
             "| cell | winner | margin over runner-up | " + " | ".join(_title(m) for m in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for w in cells_out:
        ci = w.get("margin_ci95")
        margin = "-" if w.get("margin") is None else f"{w['margin']:+.3f}" + (f" ± {ci:.3f}" if ci is not None else "")
        runner = _title(w["runner_up"]) if w["runner_up"] else "-"
        means = " | ".join(f"{w['mean_' + m]:.3f}" if "mean_" + m in w else "-" for m in names)
        lines.append(f"| {w['cell']} | {_title(w['winner'])} | {margin} vs {runner} | {means} |")
    paths["report"].write_text("\n".join(lines) + "\n")
    plot_map(cells_out, paths["plot"], setting)
    return paths


def plot_map(cells: list[dict], path: Path, setting: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concepts = sorted({c["concept_shift"] for c in cells})
    features = sorted({c["feature_shift"] for c in cells})
    methods = sorted({c["winner"] for c in cells})
    colour = {m: i for i, m in enumerate(methods)}
    grid = np.full((len(concepts), len(features)), np.nan)
    fig, ax = plt.subplots(figsize=(2.8 * len(features) + 2, 1.6 * len(concepts) + 1.5))
    for c in cells:
        i, j = concepts.index(c["concept_shift"]), features.index(c["feature_shift"])
        grid[i, j] = colour[c["winner"]]
        ci = c.get("margin_ci95")
        margin = "" if c.get("margin") is None else \
            f"\n+{c['margin']:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")
        ax.text(j, i, f"{_title(c['winner'])}\n{c['winner_mean']:.3f}{margin}", ha="center", va="center", fontsize=8)
    ax.imshow(grid, cmap="Pastel1", vmin=0, vmax=max(8, len(methods)), aspect="auto")
    ax.set_xticks(range(len(features)), [f"feature {f:g}" for f in features])
    ax.set_yticks(range(len(concepts)), [f"concept {c:g}" for c in concepts])
    ax.set_title(f"best method per cell (test balanced accuracy, margin over runner-up), setting {setting}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
