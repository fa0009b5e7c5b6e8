"""Accuracy of every method on the synthetic vendor-shift CMR task in the FLARE simulator, several seeds.

Each (method, seed) is a real simulator run; the table holds per-site personalised and global-only metrics
from the final validation.  A *centralised* upper reference trains one model on the pooled training data of
all sites (same pretrained base, same number of epochs) and evaluates it on each site's validation data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from flare_duallora.metrics import HEADLINE
from flare_duallora.training.from_bundle import build_site
from flare_duallora.training.pretrain import pooled_datalist
from flare_duallora.training.site import make_loader
from flare_duallora.bundle import BundleRuntime
from flare_duallora.deploy.runs import run_method
from flare_duallora.synthetic_tasks import TaskSetup

METHODS = ("local", "full", "fedit", "ffa", "fedsa", "duallora", "fedopal", "pfedst")


def _rows_from_result(task: str, method: str, seed: int, site_results: dict) -> list[dict]:
    rows = []
    for site, kinds in sorted(site_results.items()):
        for kind, m in kinds.items():
            rows.append({"task": task, "method": method, "seed": seed, "site": site, "model": kind,
                         **{k: m.get(k) for k in HEADLINE}, "n": m.get("n")})
    return rows


def centralised(setup: TaskSetup, workdir: Path, epochs: int, seed: int) -> dict:
    """Full fine-tuning on the pooled training data; evaluated on every site's own validation data."""
    pooled = pooled_datalist([setup.datalist_dir / f"{s}.json" for s in setup.sites], workdir / "pooled.json")
    trainer = build_site(setup.bundle, {**setup.adapter, "method": "full", "seed": seed}, pooled, setup.overrides,
                         device="auto", seed=seed)
    trainer.train_round(epochs=epochs)
    out = {}
    for site in setup.sites:
        rt = BundleRuntime(setup.bundle, overrides={**setup.overrides, "datalist": str(setup.datalist_dir / f"{site}.json")})
        loader = make_loader(rt.val_dataset, rt.val_batch_size, False)
        metrics = trainer.evaluate(loader)
        out[site] = {"personalised": metrics["personalised"]}  # one model: the pooled one
    return out


def run_accuracy(setups: Sequence[TaskSetup], methods: Sequence[str], workdir: Path, rounds: int,
                 local_epochs: int, log=print) -> list[dict]:
    rows: list[dict] = []
    for setup in setups:
        seed = int(setup.adapter.get("seed", 0))
        for method in methods:
            work = workdir / f"{setup.name}_seed{seed}" / method
            log(f"[{setup.name} seed {seed}] {method} ...")
            result = run_method(setup, method, work, rounds=rounds, local_epochs=local_epochs, seed=seed)
            if not result.ok or not result.site_results:
                log(f"  FAILED (exit {result.returncode}); see {result.workspace}")
                rows.append({"task": setup.name, "method": method, "seed": seed, "site": None, "model": "failed"})
                continue
            rows += _rows_from_result(setup.name, method, seed, result.site_results)
        log(f"[{setup.name} seed {seed}] centralised reference ...")
        rows += _rows_from_result(setup.name, "centralised", seed,
                                  centralised(setup, workdir / f"{setup.name}_seed{seed}", rounds * local_epochs, seed))
    return rows


def summarise(rows: list[dict], metric: str = "balanced_accuracy") -> list[dict]:
    """Mean over sites, then mean and std over seeds, per task / method / model."""
    import numpy as np

    groups: dict = {}
    for r in rows:
        if r.get("site") is None or r.get(metric) is None:
            continue
        groups.setdefault((r["task"], r["method"], r["model"], r["seed"]), []).append(r)
    per_seed: dict = {}
    for (task, method, model, seed), rs in groups.items():
        per_seed.setdefault((task, method, model), []).append(
            {k: float(np.nanmean([x[k] for x in rs if x[k] is not None])) for k in HEADLINE})
    out = []
    for (task, method, model), seeds in sorted(per_seed.items()):
        row = {"task": task, "method": method, "model": model, "seeds": len(seeds)}
        for k in HEADLINE:
            vals = np.array([s[k] for s in seeds])
            row[k] = float(np.nanmean(vals))
            row[f"{k}_std"] = float(np.nanstd(vals))
        out.append(row)
    return out


def write_outputs(rows: list[dict], summary: list[dict], out_dir: Path, machine: str) -> dict:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"rows": out_dir / "accuracy_per_site.csv", "summary": out_dir / "accuracy_summary.csv",
             "report": out_dir / "accuracy_report.md", "plot": out_dir / "accuracy.png"}
    keys = ["task", "method", "seed", "site", "model", *HEADLINE, "n"]
    with open(paths["rows"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    skeys = ["task", "method", "model", "seeds", *[x for k in HEADLINE for x in (k, f"{k}_std")]]
    with open(paths["summary"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=skeys)
        w.writeheader()
        w.writerows(summary)
    lines = ["# Accuracy benchmark", "", f"Machine: {machine}", "",
             "Mean over sites, then mean ± std over seeds (validation data of each site).", "",
             "| task | method | model | seeds | " + " | ".join(HEADLINE) + " |",
             "|---|---|---|---|" + "---|" * len(HEADLINE)]
    for s in summary:
        lines.append(f"| {s['task']} | {s['method']} | {s['model']} | {s['seeds']} | "
                     + " | ".join(f"{s[k]:.3f} ± {s[f'{k}_std']:.3f}" for k in HEADLINE) + " |")
    paths["report"].write_text("\n".join(lines) + "\n")
    _plot(summary, paths["plot"])
    return paths


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [s for s in summary if s["task"] == task]
        methods = sorted({s["method"] for s in rows})
        for i, model in enumerate(("personalised", "global_only")):
            vals = [next((s for s in rows if s["method"] == m and s["model"] == model), None) for m in methods]
            xs = [j + (i - 0.5) * 0.38 for j in range(len(methods))]
            nan = float("nan")  # no bar where a method has no such model (the centralised one has no global-only)
            ax.bar(xs, [v["balanced_accuracy"] if v else nan for v in vals], width=0.38,
                   yerr=[v["balanced_accuracy_std"] if v else nan for v in vals], label=model, capsize=2)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30)
        ax.set_ylabel("balanced accuracy")
        ax.set_title(task)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
