"""``flare-duallora``: generate data, prepare bundles and sites, build jobs, run the simulator, benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from flare_duallora.workflows import prepare_cmr, results_table, run_method

    setup = prepare_cmr(args.workdir, preset=args.preset, seed=args.seed)
    print(f"running {args.method} on sites {setup.sites} for {args.rounds} rounds in the FLARE simulator ...")
    result = run_method(setup, args.method, args.workdir, rounds=args.rounds, local_epochs=args.local_epochs,
                        seed=args.seed)
    if not result.ok or not result.site_results:
        print(result.log[-4000:], file=sys.stderr)
        print(f"the simulator run failed (exit code {result.returncode}); workspace: {result.workspace}",
              file=sys.stderr)
        return 1
    print(f"\nPer-site results of {args.method} (validation data of each site):\n")
    print(results_table(result))
    print(f"\nworkspace: {result.workspace}; personalised bundles under {Path(args.workdir) / 'site_state'}")
    return 0


def _cmd_generate(args) -> int:
    if args.task == "cmr":
        from flare_duallora.data.synthetic_cmr import generate_cmr

        roots = generate_cmr(args.out, n_per_vendor=args.n, shape=tuple(args.shape), seed=args.seed,
                             id_offset=args.id_offset)
        print(json.dumps({"acdc": str(roots[0]), "mnms": str(roots[1])}))
    else:
        from flare_duallora.data.synthetic_isic import generate_isic

        images, csv = generate_isic(args.out, n_per_center=args.n, size=args.size, seed=args.seed)
        print(json.dumps({"images": str(images), "split_csv": str(csv)}))
    return 0


def _cmd_split(args) -> int:
    from flare_duallora.data import datalists

    if args.task == "cmr":
        out = datalists.split_cmr(args.acdc, args.mnms, args.out, label_mode=args.label_mode,
                                  val_fraction=args.val_fraction, seed=args.seed)
    else:
        out = datalists.split_isic(args.root, args.csv, args.out)
    print(json.dumps({k: str(v) for k, v in out.items()}, indent=1))
    return 0


def _cmd_bundle(args) -> int:
    from flare_duallora.workflows import init_bundle

    print(init_bundle(args.name, args.dest))
    return 0


def _cmd_pretrain(args) -> int:
    from flare_duallora.training.pretrain import pretrain_backbone

    overrides = json.loads(args.overrides) if args.overrides else {}
    pretrain_backbone(args.bundle, args.datalist, overrides, epochs=args.epochs, device=args.device, seed=args.seed)
    return 0


def _cmd_job(args) -> int:
    from flare_duallora.flare.job import build_job, export_job

    adapter = {"method": args.method, "blocks": args.blocks, "rank": args.rank, "head": args.head}
    if args.target_modules:
        adapter["target_modules"] = args.target_modules
    overrides = json.loads(args.overrides) if args.overrides else {}
    job = build_job(args.name or f"{args.method}_job", args.bundle, args.datalists, adapter,
                    num_clients=args.num_clients, num_rounds=args.rounds, local_epochs=args.local_epochs,
                    bundle_overrides=overrides)
    print(export_job(job, args.out))
    return 0


def _cmd_site_config(args) -> int:
    from flare_duallora.flare.site_config import install_site_config, privacy_config

    privacy = privacy_config(args.method, args.head) if args.privacy else None
    for path in install_site_config(args.local_dir, privacy=privacy):
        print(path)
    return 0


def _cmd_bench(args) -> int:
    from flare_duallora.bench import cli as bench_cli

    return bench_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flare-duallora", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="federated DualLoRA on synthetic vendor-shift CMR in the FLARE simulator")
    d.add_argument("--workdir", default="flare_duallora_demo")
    d.add_argument("--preset", choices=["tiny", "small", "full"], default="small")
    d.add_argument("--method", default="duallora")
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--local-epochs", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)

    g = sub.add_parser("generate", help="synthetic data in the real on-disk formats")
    g.add_argument("task", choices=["cmr", "isic"])
    g.add_argument("--out", required=True)
    g.add_argument("--n", type=int, default=20, help="subjects per vendor (cmr) or images per centre (isic)")
    g.add_argument("--shape", type=int, nargs=3, default=[64, 64, 10])
    g.add_argument("--size", type=int, default=224)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--id-offset", type=int, default=0)
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("split", help="one datalist per client (CMR: per vendor; ISIC: per centre)")
    s.add_argument("task", choices=["cmr", "isic"])
    s.add_argument("--acdc")
    s.add_argument("--mnms")
    s.add_argument("--root")
    s.add_argument("--csv")
    s.add_argument("--out", required=True)
    s.add_argument("--label-mode", choices=["binary", "multiclass"], default="binary")
    s.add_argument("--val-fraction", type=float, default=0.25)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_split)

    b = sub.add_parser("bundle", help="copy a reference bundle (cmr3d, cls2d) to a folder of yours")
    b.add_argument("name")
    b.add_argument("dest")
    b.set_defaults(func=_cmd_bundle)

    pt = sub.add_parser("pretrain", help="pretrain a bundle's backbone on a disjoint cohort -> models/model.pt")
    pt.add_argument("--bundle", required=True)
    pt.add_argument("--datalist", required=True, help="a pooled datalist (another label set, other subjects)")
    pt.add_argument("--overrides", help="JSON bundle overrides, e.g. '{\"image_size\": [32, 32, 8]}'")
    pt.add_argument("--epochs", type=int, default=10)
    pt.add_argument("--device", default="auto")
    pt.add_argument("--seed", type=int, default=0)
    pt.set_defaults(func=_cmd_pretrain)

    j = sub.add_parser("job", help="export a FLARE job folder for nvflare simulator / job submit")
    j.add_argument("--bundle", required=True)
    j.add_argument("--datalists", required=True, help="folder with <site>.json datalists (on each site)")
    j.add_argument("--method", default="duallora")
    j.add_argument("--blocks", default="last:2")
    j.add_argument("--rank", type=int, default=8)
    j.add_argument("--head", default="vit.classification_head")
    j.add_argument("--target-modules")
    j.add_argument("--rounds", type=int, default=5)
    j.add_argument("--local-epochs", type=int, default=1)
    j.add_argument("--num-clients", type=int, default=4)
    j.add_argument("--overrides")
    j.add_argument("--name")
    j.add_argument("--out", required=True)
    j.set_defaults(func=_cmd_job)

    sc = sub.add_parser("site-config", help="write local/resources.json (allow-list) and privacy.json for a site")
    sc.add_argument("local_dir")
    sc.add_argument("--privacy", action="store_true", help="also install the private-key filter scope")
    sc.add_argument("--method", default="duallora")
    sc.add_argument("--head", default="vit.classification_head")
    sc.set_defaults(func=_cmd_site_config)

    be = sub.add_parser("bench", help="benchmarks: accuracy, comm, speed")
    be.add_argument("kind", choices=["accuracy", "comm", "speed"])
    be.add_argument("--setting", choices=["tiny", "small", "full"], default="small")
    be.add_argument("--out", default="bench_results")
    be.add_argument("--seeds", type=int, default=3)
    be.add_argument("--methods", nargs="*")
    be.add_argument("--rounds", type=int, default=5)
    be.add_argument("--local-epochs", type=int, default=2)
    be.add_argument("--device", default="auto")
    be.add_argument("--tasks", nargs="*", choices=["cmr", "isic"], default=["cmr", "isic"],
                    help="accuracy: synthetic vendor-shift CMR and/or synthetic Fed-ISIC2019")
    be.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
