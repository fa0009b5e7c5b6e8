"""What runs report to people: one line per round, the per-site table, each failed site's root cause."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

from flare_duallora.flare.run_files import RunOutputs
from flare_duallora.metrics import HEADLINE, SEGMENTATION_HEADLINE

_EXCEPTION_LINE = re.compile(r"\b([A-Z]\w*(?:Error|Exception|NotAuthorized|Blocked\w*))\b[:\s].*")


def _first_exception_line(path: Path) -> Optional[str]:
    """The first line of a log that names an exception: the root cause comes first, its consequences after."""
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        m = _EXCEPTION_LINE.search(line)
        if m and "Traceback" not in line:
            return m.group(0).strip()[:1500]
    return None


def diagnose_sites(site_roots: dict, outputs: RunOutputs, job_id: str, server_root: Optional[Path] = None) -> dict:
    """``{site: root cause}``: the server's verdict when it wrote one, else what each site's records and logs say
    (``site_roots``: each site's workspace folder; logs are read there and in its ``<job id>/`` folder)."""
    failures = dict(outputs.failed_sites)
    for site, root in site_roots.items():
        if site in failures:
            continue
        causes = [e.get("cause") for e in outputs.site_records.get(site, []) if e.get("cause")]
        if causes:
            failures[site] = causes[0]
            continue
        for folder in (Path(root) / job_id, Path(root)):
            line = next((x for x in (_first_exception_line(folder / n) for n in ("error_log.txt", "log.txt")) if x),
                        None)
            if line and not outputs.completed:
                failures[site] = line
                break
    if not outputs.status and server_root is not None:
        line = _first_exception_line(Path(server_root) / "log.txt")
        if line:
            failures.setdefault("server", line)
    return failures


def format_round(p: dict, n_sites: int) -> str:
    loss = f"{p['mean_loss']:.4f}" if isinstance(p.get("mean_loss"), (int, float)) else "n/a"
    mib = (p.get("bytes_received") or 0) / 2**20
    failed = f", failed: {', '.join(p['failed'])}" if p.get("failed") else ""
    bounded = "".join(f", {len(p[k])} {k} ({', '.join(p[k])})" for k in ("clipped", "capped") if p.get(k))
    return (f"round {p['round'] + 1}/{p['num_rounds']}: {len(p.get('answered', []))}/{n_sites} sites answered "
            f"({len(p.get('accepted', []))} accepted){failed}{bounded}, mean loss {loss}, {mib:.2f} MiB received "
            f"[{p.get('seconds', 0):.0f} s]")




MODELS_EXPLAINED = ("personalised = the site's own model: base + shared (global) adapters + its private adapters; "
                    "global-only = the same with the private adapters left out (what every site shares).")


def table_metrics(site_results: dict) -> tuple[str, ...]:
    """The columns for the task the sites report: Dice and HD95 (plus the bundle's ``val_*`` key metric) for
    segmentation, balanced accuracy ... AUC for classification."""
    for entry in site_results.values():
        m = entry.get("personalised") if isinstance(entry, dict) else None
        if isinstance(m, dict) and "dice" in m:
            return SEGMENTATION_HEADLINE + tuple(sorted(k for k in m if k.startswith("val_")))
    return HEADLINE


def _title(metric: str, site_results: dict) -> str:
    """A column title: ``hd95 (mm)`` / ``hd95 (voxels)`` when every site measured it in the same unit."""
    if metric != "hd95":
        return metric
    units = {m.get("hd95_unit") for e in site_results.values() if isinstance(e, dict)
             for m in e.values() if isinstance(m, dict) and "hd95" in m}
    return {frozenset({1}): "hd95 (mm)", frozenset({0}): "hd95 (voxels)"}.get(frozenset(units), metric)


def results_table(site_results: dict, metrics: Optional[Sequence[str]] = None) -> str:
    """Per-site and mean personalised / global-only metrics as a markdown table (with each site's number of
    validation subjects or volumes); columns by task (:func:`table_metrics`) unless ``metrics`` names them; a site
    whose validation failed gets a row with its cause."""
    metrics = tuple(metrics) if metrics is not None else table_metrics(site_results)
    rows = ["| site | n val | model | " + " | ".join(_title(m, site_results) for m in metrics) + " |",
            "|" + "---|" * (len(metrics) + 3)]
    means: dict = {}
    for site in sorted(site_results):
        entry = site_results[site]
        if "error" in entry:
            rows.append(f"| {site} | - | failed | {entry['error']} |" + " |" * (len(metrics) - 1))
            continue
        for kind in ("personalised", "global_only"):
            m = entry.get(kind)
            if not m:
                continue
            vals = [m.get(k) for k in metrics]
            means.setdefault(kind, []).append(vals)
            cells = " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals)
            rows.append(f"| {site} | {m.get('n', '?')} | {kind.replace('_', '-')} | {cells} |")
    for kind, vals in means.items():
        cols = list(zip(*vals))
        cells = " | ".join(_mean(c) for c in cols)
        rows.append(f"| **mean** | | {kind.replace('_', '-')} | {cells} |")
    return "\n".join(rows)


def _mean(values) -> str:
    vals = [v for v in values if v is not None]
    return f"{sum(vals) / len(vals):.3f}" if vals else "n/a"


def privacy_lines(site_results: dict) -> list[str]:
    """One line per site that trained with differential privacy: the budget it spent and the unit it protects."""
    out = []
    for site, entry in sorted(site_results.items()):
        p = entry.get("privacy") if isinstance(entry, dict) else None
        if isinstance(p, dict):
            out.append(f"{site}: ({p['epsilon']:.3g}, {p['delta']:g})-DP per {p['unit']} (target epsilon "
                       f"{p['target_epsilon']:g}, noise multiplier {p['noise_multiplier']:.3g}, {p['steps']} steps, "
                       f"{p['accountant']})")
    return out


MAP_POINTER = ("This demo's cohort has the synthetic CMR generator's default site differences (concept shift 0, "
               "feature shift 1): the map's cell 'concept none, feature low', at a smaller size. Which model pays "
               "depends on how the sites differ: see the README's 'Where personalisation pays' "
               "(flare-duallora bench accuracy --map).")


def comparison_lines(site_results: dict) -> list[str]:
    """Which model did better at each site on the table's first metric (balanced accuracy or Dice: higher is
    better), on that site's own validation data."""
    metric = table_metrics(site_results)[0]
    out = []
    for site, entry in sorted(site_results.items()):
        if not isinstance(entry, dict) or "error" in entry:
            continue
        p, g = (entry.get(k, {}).get(metric) if isinstance(entry.get(k), dict) else None
                for k in ("personalised", "global_only"))
        if p is None or g is None:
            continue
        if abs(p - g) < 5e-4:
            verdict = "both models did the same"
        else:
            verdict = f"the {'personalised' if p > g else 'global-only'} model did better"
        out.append(f"{site}: {verdict} ({metric} {p:.3f} personalised, {g:.3f} global-only)")
    return out


def results_report(result, title: str) -> str:
    """What the CLI prints after a completed run (the demo and ``simulate`` alike): the per-site table of each
    site's final validation, what the two models are, which did better at each site, the privacy budget spent, where
    the results are and where each site's bundles went."""
    lines = [f"{title} (each site's own validation data):", "", results_table(result.site_results), "",
             MODELS_EXPLAINED]
    compared = comparison_lines(result.site_results)
    if compared:
        lines += ["", *compared, MAP_POINTER]
    dp = privacy_lines(result.site_results)
    if dp:
        lines += ["", *dp]
    lines += ["", f"results: {result.outputs.server_dir / 'site_results.json'}"]
    for site in sorted(result.site_records):
        bundles = next((e.get("bundles") for e in result.site_records[site] if e.get("event") == "validate"), None)
        if isinstance(bundles, dict) and "personalised" in bundles:
            lines.append(f"bundles of {site}: {Path(bundles['personalised']).parent}/{{personalised,global}}")
    return "\n".join(lines)
