"""Two variants of one method compared at the learning rate each variant's own summary chose."""

import csv

import numpy as np
import pytest

from flare_duallora.bench.variants import compare

RUN_FIELDS = ["task", "method", "lr", "seed", "site", "model", "split", "pick", "round", "balanced_accuracy"]


def _write(folder, scores, chosen_lr):
    """scores: {(site, seed): value} for fedopal personalised and global-only at ``chosen_lr`` (and noise at 0.1)."""
    folder.mkdir()
    rows = []
    for model in ("personalised", "global_only"):
        for (site, seed), value in scores.items():
            for lr, v in ((chosen_lr, value), ("0.1", 0.0)):
                for split in ("val", "test"):
                    rows.append({"task": "cmr3d", "method": "fedopal", "lr": lr, "seed": seed, "site": site,
                                 "model": model, "split": split, "pick": "last", "round": 5, "balanced_accuracy": v})
    with open(folder / "accuracy_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, RUN_FIELDS)
        w.writeheader()
        w.writerows(rows)
    with open(folder / "accuracy_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["task", "method", "model", "pick", "lr"])
        w.writeheader()
        w.writerows({"task": "cmr3d", "method": "fedopal", "model": m, "pick": "last", "lr": chosen_lr}
                    for m in ("personalised", "global_only"))


def test_variants_are_compared_at_their_own_chosen_rate_with_a_paired_test(tmp_path):
    a = {(site, seed): 0.6 + 0.01 * seed + (0.05 if site == "s1" else 0.0) for site in ("s1", "s2") for seed in range(5)}
    b = {k: v - 0.1 - 0.001 * k[1] for k, v in a.items()}  # worse everywhere: the smallest possible Wilcoxon p
    _write(tmp_path / "a", a, "0.01")
    _write(tmp_path / "b", b, "0.003")
    table = compare(tmp_path / "a", tmp_path / "b", "fedopal", ("private", "joint"))
    row = next(line for line in table.splitlines() if "| personalised |" in line)
    per_seed = [np.mean([a[("s1", s)], a[("s2", s)]]) for s in range(5)]
    assert f"{np.mean(per_seed):.3f} ± " in row
    assert "+0.102" in row and "(10 pairs)" in row
    p = float(row.split("|")[6].split("(")[0])
    assert p == pytest.approx(0.002, abs=1e-3)  # 10 pairs all on one side, exact two-sided
    same = compare(tmp_path / "a", tmp_path / "a", "fedopal")
    assert "| 1 (10 pairs) |" in same
