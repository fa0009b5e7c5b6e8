"""How far honest federations are from the server's influence bounds (the measurement behind their defaults).

For each task set-up (synthetic CMR in ACDC + M&Ms vendor proportions, synthetic Fed-ISIC2019 in its centre counts),
method and seed, one in-process federation (:func:`~flare_duallora.bench.federation.run_in_process`: the recipe's own
executor, filter and aggregator) runs with the job defaults, and every round reports, per site:

* ``norm_ratio``: the site's update norm over the median update norm of the *other* sites that round (what
  ``clip_ratio`` bounds);
* ``share``: the site's share of the aggregation weights before any cap (what ``max_weight_share`` bounds);
* the clips and caps the aggregator applied (an honest federation should have none).

``python -m flare_duallora.bench.bounds --preset tiny --seeds 2 --out bounds.json`` writes every round and the maxima.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


def round_stats(summary: dict) -> dict:
    """``{site: {"norm_ratio": r, "share": s}}`` of one round's aggregation summary (``update_norm``, ``declared``)."""
    norms = summary.get("update_norm") or {}
    weights = summary.get("declared") or {}
    total = sum(weights.values()) or 1.0
    out = {}
    for site, n in norms.items():
        others = [v for s, v in norms.items() if s != site]
        med = statistics.median(others) if others else 0.0
        out[site] = {"norm_ratio": (n / med) if med > 0 else None, "share": weights.get(site, 0.0) / total}
    return out


def measure(task: str, preset: str, methods: Sequence[str], seeds: Sequence[int], workdir: Path,
            rounds: int, local_epochs: int, lr: float, log: Callable[[str], None] = print) -> list[dict]:
    from flare_duallora.bench.federation import run_in_process
    from flare_duallora.deploy.recipe import DualLoRARecipe
    from flare_duallora.synthetic_tasks import prepare_cmr, prepare_isic

    setup = {"cmr": prepare_cmr, "isic": prepare_isic}[task](workdir, preset=preset, seed=0, log=log)
    rows = []
    for seed in seeds:
        datalists = setup.resplit(seed, workdir / "splits" / f"{task}_{preset}_seed{seed}")
        for method in methods:
            t0 = time.perf_counter()
            recipe = DualLoRARecipe(
                name=f"{task}_{method}", target="sim", bundle_root=str(setup.bundle),
                settings={**setup.adapter, "method": method, "seed": seed}, clients=setup.sites,
                datalist_dir=str(datalists), num_rounds=rounds, local_epochs=local_epochs,
                bundle_overrides={**setup.overrides, "learning_rate": lr}, seed=seed, device="cpu",
                export_bundles=False)
            out = run_in_process(recipe, workdir / "runs" / f"{task}_{preset}_{method}_{seed}")
            for summary in out.rounds:
                for site, st in round_stats(summary).items():
                    rows.append({"task": task, "preset": preset, "method": method, "seed": seed,
                                 "round": summary["round"], "site": site, **st,
                                 "clipped": site in (summary.get("clipped") or {}),
                                 "capped": site in (summary.get("capped") or {})})
            log(f"{task} {preset} {method} seed {seed}: {len(out.rounds)} rounds, "
                f"failures {out.failures or 'none'} ({time.perf_counter() - t0:.1f} s)")
    return rows


def maxima(rows: list[dict]) -> dict:
    """Per task and preset: the largest norm ratio and share seen, and how many clips and caps there were."""
    out: dict = {}
    for r in rows:
        key = f"{r['task']} {r['preset']}"
        m = out.setdefault(key, {"max_norm_ratio": 0.0, "max_share": 0.0, "clips": 0, "caps": 0, "site_rounds": 0,
                                 "runs": set()})
        if r["norm_ratio"] is not None and r["norm_ratio"] > m["max_norm_ratio"]:
            m["max_norm_ratio"], m["at"] = r["norm_ratio"], f"{r['method']} seed {r['seed']} round {r['round']} " \
                                                            f"{r['site']}"
        m["max_share"] = max(m["max_share"], r["share"])
        m["clips"] += int(r["clipped"])
        m["caps"] += int(r["capped"])
        m["site_rounds"] += 1
        m["runs"].add((r["method"], r["seed"]))
    for m in out.values():
        m["runs"] = len(m["runs"])
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from flare_duallora.engine import method_names

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tasks", default="cmr,isic")
    p.add_argument("--methods", default=",".join(m for m in method_names()))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--work", default="bounds_work")
    p.add_argument("--out", default="bounds.json")
    a = p.parse_args(argv)
    rows = []
    t0 = time.perf_counter()
    for task in a.tasks.split(","):
        rows += measure(task, a.preset, a.methods.split(","), range(a.first_seed, a.first_seed + a.seeds),
                        Path(a.work).resolve(), a.rounds,
                        a.local_epochs, a.lr)
        Path(a.out).write_text(json.dumps({"maxima": maxima(rows), "rows": rows}, indent=1))
    result = maxima(rows)
    Path(a.out).write_text(json.dumps({"maxima": result, "rows": rows, "seconds": time.perf_counter() - t0},
                                      indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
