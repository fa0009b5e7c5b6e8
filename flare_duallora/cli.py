"""``flare-duallora``: run the demo, prepare data, bundles and sites, build and run FLARE jobs, benchmark.

Exit codes: 0 done; 1 a run failed (each failed site and its cause are printed); 2 bad input (one line per problem).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep descriptions as written and show an option's default once: not when its help already says what the
    default is, and not for options without one (None) or flags (False)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return help
        return super()._get_help_string(action)


def _method_names() -> list[str]:
    from flare_duallora.engine import method_names

    return method_names()


def _report_failure(result, what: str) -> bool:
    """Print why a run failed (the run's status and each failed site's cause) to stderr; True if it failed."""
    if result.ok:
        return False
    print(f"error: {what} failed\n{result.describe_failure()}", file=sys.stderr)
    return True


# ---------------------------------------------------------------------------------------------- demo
def _cmd_demo(args) -> int:
    from flare_duallora.deploy.report import results_report
    from flare_duallora.deploy.runs import run_method
    from flare_duallora.synthetic_tasks import DEMO_TASKS

    setup = DEMO_TASKS[args.task](args.workdir, preset=args.preset, seed=args.seed)
    print(f"running {args.method} on sites {', '.join(setup.sites)} for {args.rounds} rounds x {args.local_epochs} "
          f"local epochs in the FLARE simulator ...", flush=True)
    dp = _privacy_from_args(args)
    result = run_method(setup, args.method, args.workdir, rounds=args.rounds, local_epochs=args.local_epochs,
                        seed=args.seed, timeout=args.timeout, log=lambda line: print(line, flush=True),
                        **({"differential_privacy": dp} if dp else {}))
    if _report_failure(result, "the federated run"):
        return 1
    print("\n" + results_report(result, f"Per-site results of {args.method}"))
    return 0


# ---------------------------------------------------------------------------------------------- data, bundles
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

    if args.task == "cmr" and args.seg_task == "segmentation":
        from flare_duallora.data.cmr_segmentation import split_cmr_segmentation

        out = split_cmr_segmentation(args.acdc, args.mnms, args.out, val_fraction=args.val_fraction, seed=args.seed)
    elif args.task == "cmr":
        out = datalists.split_cmr(args.acdc, args.mnms, args.out, label_mode=args.label_mode,
                                  val_fraction=args.val_fraction, seed=args.seed)
    else:
        out = datalists.split_isic(args.root, args.csv, args.out)
    print(json.dumps({k: str(v) for k, v in out.items()}, indent=1))
    return 0


def _cmd_bundle(args) -> int:
    from flare_duallora.bundle.reference import init_bundle

    dest = init_bundle(args.name, args.dest)
    if args.encoder_from:
        from flare_duallora.training.encoder_transfer import segmentation_base_from_bundle

        print(f"encoder from {args.encoder_from}: {segmentation_base_from_bundle(args.encoder_from, dest)}",
              file=sys.stderr)
    print(dest)
    return 0


def _cmd_pretrain(args) -> int:
    from flare_duallora.training.pretrain import pooled_datalist, pretrain_backbone

    overrides = _json_arg(args.overrides, "--overrides")
    datalist = Path(args.datalist)
    if datalist.is_dir():  # a folder of site datalists (flare-duallora split): pool them
        files = sorted(p for p in datalist.glob("*.json") if p.name != "clients.json")
        if not files:
            raise ValueError(f"option --datalist: no datalists in {datalist}")
        datalist = pooled_datalist(files, datalist / "pooled.json")
    pretrain_backbone(args.bundle, datalist, overrides, epochs=args.epochs, device=args.device, seed=args.seed,
                      mode=args.mode)
    return 0


def _json_arg(text, option: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"option {option}: not valid JSON ({e.msg} at column {e.colno}): {text}") from None
    if not isinstance(value, dict):
        raise ValueError(f"option {option}: expected a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------- jobs
def _privacy_from_args(args) -> Optional[dict]:
    """``--dp-epsilon`` (with ``--dp-delta``, ``--dp-max-grad-norm``) -> the ``differential_privacy`` setting, or
    None without ``--dp-epsilon``."""
    if args.dp_epsilon is None:
        return None
    return {"epsilon": args.dp_epsilon, "delta": args.dp_delta, "max_grad_norm": args.dp_max_grad_norm}


def _add_privacy_options(parser) -> None:
    parser.add_argument("--dp-epsilon", type=float, help="train every site with DP-SGD to this (epsilon, delta) "
                                                         "budget for the whole job (see README: Differential privacy)")
    parser.add_argument("--dp-delta", type=float, default=1e-5, help="DP delta (with --dp-epsilon)")
    parser.add_argument("--dp-max-grad-norm", type=float, default=1.0,
                        help="DP per-example clipping norm (with --dp-epsilon)")


def _settings_from_args(args) -> dict:
    settings = {"method": args.method, "rank": args.rank, "head": args.head}
    if args.blocks not in (None, "", "all"):
        settings["blocks"] = int(args.blocks) if args.blocks.isdigit() else args.blocks
    if args.target_modules:
        settings["target_modules"] = args.target_modules
    return settings


def _cmd_job(args) -> int:
    from flare_duallora.deploy.recipe import DualLoRARecipe

    sites = args.sites.split(",") if args.sites else None
    recipe = DualLoRARecipe(
        name=args.name or f"{args.method}_job", target=args.target, bundle_root=args.bundle,
        settings=_settings_from_args(args), clients=sites, min_clients=args.min_clients,
        datalist_dir=args.datalists, num_rounds=args.rounds, local_epochs=args.local_epochs,
        bundle_overrides=_json_arg(args.overrides, "--overrides"), weigh_by=args.weigh_by,
        robust_aggregation=args.robust_aggregation, max_failed_sites=args.max_failed_sites,
        allow_random_base=args.allow_random_base, state_name=args.state_name, resume=args.resume, task=args.task,
        bundle_ids=_json_arg(args.bundle_ids, "--bundle-ids"), differential_privacy=_privacy_from_args(args))
    recipe.export(str(Path(args.out)))
    for note in recipe.plan.notes:  # the task each bundle was read as, what the sites must provide
        print(f"note: {note}", file=sys.stderr)
    print(Path(args.out) / recipe.name)
    return 0


def _cmd_simulate(args) -> int:
    from flare_duallora.deploy.report import results_report
    from flare_duallora.deploy.simulate import run_simulator

    clients = args.clients.split(",")
    result = run_simulator(args.job, args.workspace, clients, threads=args.threads, timeout=args.timeout,
                           log=lambda line: print(line, flush=True))
    if _report_failure(result, "the simulator run"):
        return 1
    print("\n" + results_report(result, f"Per-site results of {Path(args.job).name}"))
    return 0


def _cmd_template(args) -> int:
    from flare_duallora.deploy.templates import (
        create_job_from_template, list_templates, templates_dir, template_variables,
    )

    if args.action == "list":
        print(templates_dir())
        for name in list_templates():
            print(f"  {name}")
    elif args.action == "show":
        print(json.dumps(template_variables(args.template), indent=1))
    else:
        settings = {}
        for item in args.settings:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected key=value, got {item!r}")
            try:
                settings[key.strip()] = json.loads(value)
            except ValueError:
                settings[key.strip()] = value
        sites = args.sites.split(",") if args.sites else None
        print(create_job_from_template(args.template, args.job_dir, settings, target=args.target, sites=sites))
    return 0


def _print_results(result, where: str) -> None:
    from flare_duallora.deploy.report import MODELS_EXPLAINED, results_table

    if result.site_results:
        print("\nPer-site results (each site's own validation data):\n")
        print(results_table(result.site_results))
        print(f"\n{MODELS_EXPLAINED}")
    print(f"\ncompleted; results in {where}")


def _cmd_poc(args) -> int:
    if args.action == "follow":
        return _cmd_poc_follow(args)
    import signal

    from flare_duallora.deploy.job_configs import job_components
    from flare_duallora.deploy.poc import LoopbackPocEnv, check_job_fits, check_sites, sites_for_job

    clients = check_sites(args.clients.split(",")) if args.clients else sites_for_job(args.job)
    check_job_fits(args.job, clients)  # before anything starts: one line naming the job's needs and the sites
    sharing = next((c["args"].get("sharing") for comps in job_components(args.job).values() for c in comps
                    if c["path"].endswith("PrivateKeyFilter")), None)
    print(f"POC of {len(clients)} sites on 127.0.0.1: {', '.join(clients)}", flush=True)
    env = LoopbackPocEnv(workspace=args.workspace, clients=clients, port=args.port, sharing=sharing,
                         allow_remote=args.allow_remote, timeout=args.timeout, log=lambda line: print(line, flush=True))
    interrupted = False
    try:
        result = env.run_job_folder(args.job)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        try:
            env.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        print(f"interrupted: the POC was stopped (every process of {env.root / 'poc'}, by PID)", file=sys.stderr)
        return 1
    if _report_failure(result, "the POC job"):
        return 1
    _print_results(result, str(result.result_dir))
    return 0


def _cmd_poc_follow(args) -> int:
    from flare_duallora.deploy.poc import follow_production

    if not args.startup_kit:
        raise ValueError("poc follow: give the admin startup kit with --startup-kit")
    try:
        result = follow_production(args.startup_kit, args.job, args.results, timeout=args.timeout,
                                   log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"interrupted: stopped following job {args.job} (it keeps running on the server)", file=sys.stderr)
        return 1
    if _report_failure(result, f"job {args.job}"):
        return 1
    _print_results(result, str(result.result_dir))
    return 0


def _cmd_site_config(args) -> int:
    from flare_duallora.deploy.site_config import install_site_config, privacy_config
    from flare_duallora.engine import SharingPolicy

    privacy = privacy_config(SharingPolicy(args.method, args.head).to_args()) if args.privacy else None
    policy = {"bundle_roots": list(args.bundle_root), "data_roots": list(args.data_root)}
    for item in args.bundle:
        name, sep, folder = item.partition("=")
        if not sep:
            raise ValueError(f"--bundle expects name=folder, got {item!r}")
        policy.setdefault("bundles", {})[name] = folder
    if args.allow_job_code:
        policy["allow_job_code"] = True
    if args.override_id:
        policy["override_ids"] = list(args.override_id)
    if args.allow_job_bundles:
        policy["allow_job_bundles"] = True
    if args.max_global_shift is not None:
        policy["max_global_shift"] = args.max_global_shift
    if args.state_root:
        policy["state_root"] = args.state_root
    for path in install_site_config(args.local_dir, privacy=privacy, site_policy=policy):
        print(path)
    return 0


def _cmd_bench(args) -> int:
    from flare_duallora.bench import cli as bench_cli

    return bench_cli.run(args)


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    methods = _method_names()
    method_help = f"fine-tuning method, one of: {', '.join(methods)}"
    p = argparse.ArgumentParser(prog="flare-duallora", description=__doc__, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str):
        return sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)

    d = command("demo", "federated Med-DualLoRA on synthetic vendor-shift cine CMR in the FLARE simulator")
    d.add_argument("--workdir", default="flare_duallora_demo", help="folder for data, bundle, jobs and results")
    d.add_argument("--preset", choices=["tiny", "small", "full"], default="small",
                   help="data and model size: tiny (tests), small (a laptop CPU), full (a GPU)")
    d.add_argument("--task", choices=["classification", "segmentation"], default="classification",
                   help="disease vs normal per subject, or LV / MYO / RV masks per ED and ES frame (the same "
                        "pretrained ViT as the encoder of a UNETR-style bundle); prints balanced accuracy or Dice "
                        "per vendor site")
    d.add_argument("--method", choices=methods, default="duallora", help=method_help)
    d.add_argument("--rounds", type=int, default=5, help="federated rounds")
    d.add_argument("--local-epochs", type=int, default=4, help="local epochs per round")
    d.add_argument("--seed", type=int, default=0, help="data, initialisation and shuffling seed")
    d.add_argument("--timeout", type=float, default=3600, help="seconds before the simulator run is stopped")
    _add_privacy_options(d)
    d.set_defaults(func=_cmd_demo)

    g = command("generate", "synthetic data in the real on-disk formats (ACDC + M&Ms, or Fed-ISIC2019)")
    g.add_argument("task", choices=["cmr", "isic"], help="cine CMR (ACDC + M&Ms layouts) or 2D dermoscopy (ISIC)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--n", type=int, default=20, help="subjects per vendor (cmr) or images per centre (isic)")
    g.add_argument("--shape", type=int, nargs=3, default=[64, 64, 10], help="cmr volume shape (x y z)")
    g.add_argument("--size", type=int, default=224, help="isic image size (pixels)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--id-offset", type=int, default=0, help="first subject number (disjoint cohorts)")
    g.set_defaults(func=_cmd_generate)

    s = command("split", "one datalist per client (CMR: per vendor; ISIC: per centre)")
    s.add_argument("task", choices=["cmr", "isic"], help="which dataset family")
    s.add_argument("--acdc", help="ACDC folder (cmr)")
    s.add_argument("--mnms", help="M&Ms OpenDataset folder (cmr)")
    s.add_argument("--root", help="ISIC image folder (isic)")
    s.add_argument("--csv", help="FLamby train_test_split CSV (isic)")
    s.add_argument("--out", required=True, help="output folder for <site>.json and clients.json")
    s.add_argument("--label-mode", choices=["binary", "multiclass"], default="binary",
                   help="cmr labels: disease vs normal, or the five ACDC groups")
    s.add_argument("--task", dest="seg_task", choices=["classification", "segmentation"], default="classification",
                   help="cmr: one item per subject with its diagnosis, or one per annotated frame (ED, ES) with its "
                        "mask rewritten as 0 background, 1 LV, 2 MYO, 3 RV")
    s.add_argument("--val-fraction", type=float, default=0.25, help="share of each site's subjects for validation")
    s.add_argument("--seed", type=int, default=0, help="split seed")
    s.set_defaults(func=_cmd_split)

    b = command("bundle", "copy a reference bundle (cmr3d, cmr3d_seg, cls2d) to a folder of yours")
    b.add_argument("name", help="cmr3d, cmr3d_seg or cls2d")
    b.add_argument("dest", help="destination folder")
    b.add_argument("--encoder-from", metavar="BUNDLE",
                   help="cmr3d_seg: write models/model.pt with the ViT encoder of this pretrained classification bundle "
                        "(its models/model.pt and its config's ViT size) and a seeded decoder")
    b.set_defaults(func=_cmd_bundle)

    pt = command("pretrain", "pretrain a bundle's backbone on a disjoint cohort -> models/model.pt")
    pt.add_argument("--bundle", required=True, help="the bundle folder")
    pt.add_argument("--datalist", required=True,
                    help="a datalist of subjects outside the federation, or a folder of site datalists (pooled)")
    pt.add_argument("--mode", choices=["mae", "supervised"], default="mae",
                    help="mae: self-supervised masked autoencoding (no labels, like a foundation model); supervised: "
                         "the datalist's labels")
    pt.add_argument("--overrides", help="JSON bundle overrides, e.g. '{\"image_size\": [32, 32, 8]}'")
    pt.add_argument("--epochs", type=int, default=10, help="training epochs")
    pt.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    pt.add_argument("--seed", type=int, default=0, help="random seed")
    pt.set_defaults(func=_cmd_pretrain)

    j = command("job", "check a job and export its folder (nvflare job submit / flare-duallora simulate)")
    j.add_argument("--target", required=True, choices=["sim", "poc", "prod"],
                   help="where it will run: sim and poc resolve relative paths here; prod refuses them")
    j.add_argument("--bundle", required=True, help="the MONAI bundle (a folder, or pkg://<package>/<folder>)")
    j.add_argument("--datalists", help="folder with <site>.json datalists (and clients.json)")
    j.add_argument("--sites", help="comma-separated site names (default: the datalist folder's clients.json)")
    j.add_argument("--method", choices=methods, default="duallora", help=method_help)
    j.add_argument("--blocks", default="last:2", help="adapted blocks: last:N, first:N, N, or 'all'")
    j.add_argument("--rank", type=int, default=8, help="LoRA rank")
    j.add_argument("--head", default="vit.classification_head", help="classification-head module")
    j.add_argument("--target-modules", help="regex of the modules to adapt (default: ViT attention qkv/out_proj)")
    j.add_argument("--rounds", type=int, default=5, help="federated rounds")
    j.add_argument("--local-epochs", type=int, default=3,
                   help="local epochs per round (3: what the medium accuracy benchmark runs)")
    j.add_argument("--min-clients", type=int, help="sites per round (default: all sites)")
    j.add_argument("--weigh-by", choices=["dataset_size", "steps", "uniform"], default="dataset_size",
                   help="aggregation weights")
    j.add_argument("--robust-aggregation", choices=["mean", "trimmed_mean", "median"], default="mean",
                   help="how contributions are combined")
    j.add_argument("--max-failed-sites", type=int, default=0, help="sites that may fail before the job fails")
    j.add_argument("--allow-random-base", action="store_true",
                   help="accept a bundle without models/model.pt (every site builds the same seeded base)")
    j.add_argument("--state-name", help="stable name of the resumable state (default: the job name)")
    j.add_argument("--resume", action="store_true", help="continue from the state saved under the state name")
    j.add_argument("--overrides", help="JSON bundle overrides (plain values)")
    j.add_argument("--task", choices=["auto", "classification", "segmentation"], default="auto",
                   help="what the bundle's network does (auto: read from the bundle's metadata, key metric, output)")
    j.add_argument("--bundle-ids", help="JSON map of standard ids to the bundle's own, e.g. "
                                        "'{\"train#dataset\": \"train_dataset\", \"loss\": \"lossfn\"}'")
    j.add_argument("--name", help="job name (default: <method>_job)")
    j.add_argument("--out", required=True, help="folder the job folder is written into")
    _add_privacy_options(j)
    j.set_defaults(func=_cmd_job)

    sm = command("simulate", "run an exported job folder in the FLARE simulator, with progress and a verdict")
    sm.add_argument("job", help="the job folder")
    sm.add_argument("--clients", required=True, help="comma-separated site names")
    sm.add_argument("--workspace", default="workspace", help="simulator workspace")
    sm.add_argument("--threads", type=int, help="parallel sites (default: all)")
    sm.add_argument("--timeout", type=float, default=3600, help="seconds before the run is stopped")
    sm.set_defaults(func=_cmd_simulate)

    t = command("template", "the plugin's FLARE job templates: list, show settings, create a job")
    t.add_argument("action", choices=["list", "show", "create"], help="what to do")
    t.add_argument("template", nargs="?", help="template name (show, create)")
    t.add_argument("job_dir", nargs="?", help="job folder to create (create)")
    t.add_argument("settings", nargs="*", metavar="key=value",
                   help="settings; values are JSON when they parse (8, [2, 3], {\"batch_size\": 4}), else strings")
    t.add_argument("--target", choices=["sim", "poc", "prod"], default="sim", help="where the job will run")
    t.add_argument("--sites", help="comma-separated site names whose datalists are checked")
    t.set_defaults(func=_cmd_template)

    po = command("poc", "run an exported job folder in a POC on this machine (127.0.0.1), then stop it; or follow "
                        "a job of a provisioned federation")
    po.add_argument("action", choices=["run", "follow"],
                    help="run: provision, start, submit JOB, follow it, stop; follow: follow the submitted job JOB "
                         "(its id) with an admin startup kit (production)")
    po.add_argument("job", help="run: the job folder; follow: the job id")
    po.add_argument("--clients",
                    help="comma-separated site names (default: the sites the job names, else its min_clients vendor "
                         "sites)")
    po.add_argument("--workspace", default="poc_workspace/workspace", help="folder for the POC and its results")
    po.add_argument("--port", type=int, help="server port (default: a free one)")
    po.add_argument("--allow-remote", action="store_true", help="listen on all interfaces instead of 127.0.0.1")
    po.add_argument("--timeout", type=float, default=900, help="seconds before the job is aborted")
    po.add_argument("--startup-kit", help="follow: the admin's startup kit folder")
    po.add_argument("--results", default="results", help="follow: folder the job's result is downloaded into")
    po.set_defaults(func=_cmd_poc)

    sc = command("site-config", "write local/resources.json (allow-list), privacy.json and flare_duallora.json")
    sc.add_argument("local_dir", help="the site's (or simulator workspace's) local/ folder")
    sc.add_argument("--privacy", action="store_true", help="also install the private-key filter scope")
    sc.add_argument("--method", choices=methods, default="duallora", help="sharing rule of the privacy scope")
    sc.add_argument("--head", default="vit.classification_head", help="head module of the privacy scope")
    sc.add_argument("--bundle-root", action="append", default=[], metavar="FOLDER",
                    help="a folder whose bundles jobs may use (repeat)")
    sc.add_argument("--bundle", action="append", default=[], metavar="NAME=FOLDER",
                    help="a catalogue entry: a job naming bundle_root NAME gets FOLDER (repeat)")
    sc.add_argument("--data-root", action="append", default=[], metavar="FOLDER",
                    help="a folder jobs may read datalists from (repeat)")
    sc.add_argument("--state-root", default=None,
                    help="where private state lives (default: local/flare_duallora_state)")
    sc.add_argument("--max-global-shift", type=float, default=None,
                    help="refuse a global model whose shared part moved more than this (relative norm) from the "
                         "previous one")
    sc.add_argument("--override-id", action="append", default=[], metavar="ID",
                    help="a bundle config id jobs may override, with what sits under it (repeat; default: any)")
    sc.add_argument("--allow-job-bundles", action="store_true",
                    help="let a job use a bundle it ships in its own folder (its configs are code; off by default)")
    sc.add_argument("--allow-job-code", action="store_true",
                    help="let jobs send bundle overrides with config expressions (off: plain values only)")
    sc.set_defaults(func=_cmd_site_config)

    be = command("bench", "benchmarks: accuracy, comm, speed")
    kinds = be.add_subparsers(dest="kind", required=True, metavar="{accuracy,comm,speed}", help="which benchmark")
    from flare_duallora.bench import SETTINGS as bench_settings

    for kind, what in (("accuracy", "federated accuracy protocol: methods x seeds x rates, test-set statistics"),
                       ("comm", "bytes per site per round of each method"),
                       ("speed", "local training speed, project loop against a bare loop")):
        choices, default = bench_settings[kind]
        k = kinds.add_parser(kind, help=what, description=what, formatter_class=_Formatter)
        k.add_argument("--setting", choices=choices, default=default, help="size of the benchmark")
        k.add_argument("--out", default="bench_results", help="output folder")
        k.add_argument("--methods", nargs="*", help="methods / modes (default: the benchmark's)")
        k.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
        if kind == "accuracy":
            k.add_argument("--seeds", type=int, help="seeds (default: the setting's)")
            k.add_argument("--workers", type=int, help="parallel runs (default: one per CPU core)")
            k.add_argument("--tasks", nargs="*", choices=["cmr", "isic", "cmrseg"],
                           help="synthetic vendor-shift CMR, synthetic Fed-ISIC2019, CMR segmentation (Dice per "
                                "vendor; default: cmr isic)")
            k.add_argument("--map", action="store_true",
                           help="the heterogeneity map instead: concept x feature shift on CMR, which method wins "
                                "each cell (default methods: duallora fedopal fedsa fedit local linear + centralised)")
        if kind == "accuracy":
            k.add_argument("--adapter-settings", metavar="JSON",
                           help="adapter settings every run sets, to compare a variant at the same commit, e.g. "
                                "'{\"orth_gradient\": \"joint\"}'")
            k.add_argument("--no-centralised", action="store_true", help="leave out the centralised reference")
        if kind in ("accuracy", "speed"):
            k.add_argument("--privacy", action="store_true",
                           help="accuracy: Med-DualLoRA, FedSA-LoRA, FedIT and local LoRA with DP-SGD at epsilon 1, 3, "
                                "8 and without DP; speed: the DP-SGD modes against the non-private loop")
        k.set_defaults(func=_cmd_bench)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``template create``'s ``key=value`` settings may also follow its options (argparse alone
    stops collecting positionals at the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command == "template" and all("=" in e and not e.startswith("-") for e in extra):
            args.settings = [*args.settings, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # bad input (JobCheckError, BundleConfigError, DatasetFormatError, settings): one line per problem, no
        # traceback; FLARE_DUALLORA_DEBUG=1 shows it
        if os.environ.get("FLARE_DUALLORA_DEBUG"):
            raise
        for line in getattr(e, "problems", None) or str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
