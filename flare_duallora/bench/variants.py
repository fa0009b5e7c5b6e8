"""Compare two runs of the accuracy protocol that differ in one setting (``bench accuracy --adapter-settings``).

``python -m flare_duallora.bench.variants A B --method fedopal`` reads ``A/accuracy_runs.csv`` and
``B/accuracy_runs.csv``, takes for each variant the learning rate its summary chose (last round, the method's main
model and its global-only model) and reports, per task, the test balanced accuracy (mean over sites per seed, then
mean and 95 % t interval over seeds) and the paired Wilcoxon signed-rank p over (site, seed) between the variants.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from flare_duallora.bench.accuracy import _t975

PICK = "last"


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _chosen_lr(summary: list[dict], task: str, method: str, model: str) -> str:
    for row in summary:
        if row["task"] == task and row["method"] == method and row["model"] == model and row["pick"] == PICK:
            return row["lr"]
    raise ValueError(f"no {method} {model} row for task {task} in the summary")


def _scores(folder: Path, method: str, model: str) -> dict[str, dict[tuple, float]]:
    """``{task: {(site, seed): test balanced accuracy}}`` at the learning rate the variant's summary chose."""
    runs, summary = _read(folder / "accuracy_runs.csv"), _read(folder / "accuracy_summary.csv")
    out: dict[str, dict[tuple, float]] = {}
    for task in sorted({r["task"] for r in runs if r["method"] == method}):
        lr = _chosen_lr(summary, task, method, model)
        out[task] = {(r["site"], int(r["seed"])): float(r["balanced_accuracy"]) for r in runs
                     if r["task"] == task and r["method"] == method and r["model"] == model and r["split"] == "test"
                     and r["pick"] == PICK and r["lr"] == lr and r["balanced_accuracy"] not in ("", "nan")}
    return out


def _mean_ci(scores: dict[tuple, float]) -> tuple[float, float]:
    seeds = sorted({seed for _, seed in scores})
    per_seed = [np.mean([v for (_, s), v in scores.items() if s == seed]) for seed in seeds]
    mean = float(np.mean(per_seed))
    ci = _t975(len(per_seed) - 1) * float(np.std(per_seed, ddof=1)) / np.sqrt(len(per_seed)) if len(per_seed) > 1 \
        else float("nan")
    return mean, ci


def compare(a: str | Path, b: str | Path, method: str, names: Sequence[str] = ("A", "B")) -> str:
    """A markdown table: per task and model, each variant's mean +- CI and the paired Wilcoxon p between them."""
    from scipy.stats import wilcoxon

    lines = [f"| task | model | {names[0]} | {names[1]} | mean difference | p (paired Wilcoxon, site x seed) |",
             "|---|---|---|---|---|---|"]
    for model in ("personalised", "global_only"):
        sa, sb = _scores(Path(a), method, model), _scores(Path(b), method, model)
        for task in sorted(set(sa) & set(sb)):
            keys = sorted(set(sa[task]) & set(sb[task]))
            x, y = np.array([sa[task][k] for k in keys]), np.array([sb[task][k] for k in keys])
            p = 1.0 if not np.any(x - y) else float(wilcoxon(x, y).pvalue)
            (ma, ca), (mb, cb) = _mean_ci(sa[task]), _mean_ci(sb[task])
            lines.append(f"| {task} | {model.replace('_', '-')} | {ma:.3f} ± {ca:.3f} | {mb:.3f} ± {cb:.3f} | "
                         f"{float(np.mean(x - y)):+.3f} | {p:.3g} ({len(keys)} pairs) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="the first variant's bench accuracy output folder")
    p.add_argument("b", help="the second variant's output folder")
    p.add_argument("--method", required=True, help="the method both variants ran (e.g. fedopal)")
    p.add_argument("--names", nargs=2, default=("A", "B"), help="column names of the two variants")
    args = p.parse_args(argv)
    print(compare(args.a, args.b, args.method, args.names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
