"""``flare-duallora bench {accuracy,comm,speed}``: write tables (CSV + markdown) and, for accuracy, a plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional


from flare_duallora.bench.machine import describe, describe_line
from flare_duallora.training.batch import pick_device

from flare_duallora.bench import SETTINGS  # noqa: F401  (the CLI offers these)


def _write_table(rows: list[dict], out_dir: Path, name: str, title: str, machine: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.4g}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = [f"# {title}", "", f"Machine: {machine}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out_dir / f"{name}.md"


def _command_line() -> str:
    """The command line that started this process, as typed (reports record it)."""
    import shlex
    import sys

    prog = Path(sys.argv[0]).name
    prog = "flare-duallora" if prog in ("flare-duallora", "__main__.py", "cli.py") else prog
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])


def _adapter_settings(args) -> Optional[dict]:
    """``--adapter-settings '{"orth_gradient": "joint"}'``: a JSON object of adapter settings, or None."""
    text = getattr(args, "adapter_settings", None)
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--adapter-settings: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError("--adapter-settings: expected a JSON object of adapter settings")
    return value


def run(args) -> int:
    out = Path(args.out)
    device = pick_device(args.device)
    machine = describe_line(describe(device))
    if args.kind == "comm":
        from flare_duallora.bench.comm import (
            DEFAULT_AGGREGATION_METHODS, DEFAULT_METHODS, SMALL_CMR, TINY_CMR, VIT_B_CMR, aggregation_table, comm_table,
        )

        net = TINY_CMR if args.setting == "tiny" else VIT_B_CMR
        rows = comm_table(net, args.methods or DEFAULT_METHODS)
        for r in rows:
            r["vs_full"] = round(r["vs_full"], 5) if r["vs_full"] is not None else None
        shape = "x".join(map(str, net["img_size"]))
        geometry = f"{shape}, patch {'x'.join(map(str, net['patch_size']))}, hidden {net['hidden_size']}"
        _write_table(rows, out, "comm", f"Bytes per site per round ({geometry})", machine)
        # LoRA aggregation modes: bytes on the same shapes; the error is measured on sites trained a few steps
        error_net = TINY_CMR if args.setting == "tiny" else SMALL_CMR
        agg = aggregation_table(net, error_net, args.methods or DEFAULT_AGGREGATION_METHODS)
        if agg:
            _write_table(agg, out, "comm_aggregation",
                         f"LoRA aggregation modes: bytes per site per round ({geometry}); relative error of each "
                         f"site's effective update against the exact weighted average of B_k A_k, per adapted "
                         f"layer, measured on {agg[0]['error_measured_on']} (synthetic site-specific data, weights "
                         f"1:2:4)", machine)
    elif args.kind == "speed":
        from flare_duallora.bench.speed import DEFAULT_MODES, measure, write_tables

        modes = args.methods or (("dual_last2_dp", "dual_last2_cached_dp") if getattr(args, "privacy", False)
                                 else DEFAULT_MODES)
        rows = measure(args.setting, modes, args.device, log=print)
        write_tables(rows, out, machine, args.setting)
    else:
        if getattr(args, "map", False):
            from flare_duallora.bench.heatmap import run_map

            paths = run_map(args.setting, out, methods=args.methods, seeds=args.seeds, workers=args.workers,
                            machine=machine, command=_command_line())
            print(paths["report"].read_text())
            return 0
        from flare_duallora.bench.accuracy import run_protocol

        paths = run_protocol(args.setting, out, methods=args.methods, tasks=args.tasks, seeds=args.seeds,
                             machine=machine, workers=args.workers, command=_command_line(),
                             privacy=getattr(args, "privacy", False), adapter=_adapter_settings(args),
                             centralised=not getattr(args, "no_centralised", False))
        print(paths["report"].read_text())
    return 0
