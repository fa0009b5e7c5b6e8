"""``flare-duallora bench {accuracy,comm,speed}``: write tables (CSV + markdown) and, for accuracy, a plot."""

from __future__ import annotations

import csv
from pathlib import Path


from flare_duallora.bench.machine import describe, describe_line
from flare_duallora.training.batch import pick_device


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


def run(args) -> int:
    out = Path(args.out)
    device = pick_device(args.device)
    machine = describe_line(describe(device))
    if args.kind == "comm":
        from flare_duallora.bench.comm import DEFAULT_METHODS, TINY_CMR, VIT_B_CMR, comm_table

        net = TINY_CMR if args.setting == "tiny" else VIT_B_CMR
        rows = comm_table(net, args.methods or DEFAULT_METHODS)
        for r in rows:
            r["vs_full"] = round(r["vs_full"], 5) if r["vs_full"] is not None else None
        shape = "x".join(map(str, net["img_size"]))
        _write_table(rows, out, "comm", f"Bytes per site per round ({shape}, patch "
                     f"{'x'.join(map(str, net['patch_size']))}, hidden {net['hidden_size']})", machine)
    elif args.kind == "speed":
        from flare_duallora.bench.speed import MODES, speed_table

        rows = speed_table(args.setting, args.methods or MODES, args.device)
        _write_table(rows, out, "speed", f"Local training speed ({args.setting} setting)", machine)
    else:
        from flare_duallora.bench.accuracy import METHODS, run_accuracy, summarise, write_outputs
        from flare_duallora.synthetic_tasks import prepare_cmr, prepare_isic

        work = out / "work"
        prepare = {"cmr": prepare_cmr, "isic": prepare_isic}
        setups = []
        for task in args.tasks:
            for seed in range(args.seeds):
                setup = prepare[task](work, preset=args.setting, seed=seed)
                setup.adapter["seed"] = seed
                setups.append(setup)
        rows = run_accuracy(setups, args.methods or METHODS, work, args.rounds, args.local_epochs)
        summary = summarise(rows)
        paths = write_outputs(rows, summary, out, machine)
        print(paths["report"].read_text())
    return 0
