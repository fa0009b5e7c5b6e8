"""Checks before a job ships: every bad input is reported before anything runs, one line each, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CMR_BUNDLE, TINY_CMR, tiny_recipe, write_random_cmr_site
from flare_duallora.cli import build_parser
from flare_duallora.deploy.preflight import JobCheckError
from flare_duallora.engine import method_names

SITES = ["site-a", "site-b"]


@pytest.fixture(autouse=True)
def _capture(capsys, monkeypatch):
    global _CAPSYS, _MONKEYPATCH
    _CAPSYS, _MONKEYPATCH = capsys, monkeypatch


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``flare-duallora ARGS`` in this process (the console script calls the same ``main``)."""
    from flare_duallora.cli import main

    _CAPSYS.readouterr()
    if cwd is not None:
        _MONKEYPATCH.chdir(cwd)
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out = _CAPSYS.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def job(tmp_path, datalists, *extra, bundle=CMR_BUNDLE, target="sim"):
    return cli("job", "--target", target, "--bundle", bundle, "--datalists", datalists, "--sites", ",".join(SITES),
               "--allow-random-base", "--overrides", json.dumps(TINY_CMR), "--out", tmp_path / "jobs", *extra)


@pytest.fixture(scope="module")
def datalists(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    for i, site in enumerate(SITES):
        write_random_cmr_site(root, site, n=4, n_val=2, seed=i)
    return root


def assert_refused(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(line.startswith("error: ") for line in proc.stderr.strip().splitlines()), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


def test_a_good_job_exports_with_the_server_schema(tmp_path, datalists):
    proc = job(tmp_path, datalists)
    assert proc.returncode == 0, proc.stderr
    server = json.loads((tmp_path / "jobs" / "duallora_job" / "app" / "config" / "config_fed_server.json")
                        .read_text())
    args = server["workflows"][0]["args"]
    assert args["schema"] and args["fingerprint"].startswith("sha256:") and args["reference_norm"] > 0


def test_each_bad_input_is_named_before_the_job_runs(tmp_path, datalists):
    assert_refused(job(tmp_path, datalists, bundle=tmp_path / "no_bundle"), "no_bundle")
    broken = tmp_path / "broken"
    shutil.copytree(CMR_BUNDLE, broken)
    (broken / "configs" / "train.json").write_text('{"network_def": {,}')
    assert_refused(job(tmp_path, datalists, bundle=broken), "malformed JSON", str(broken / "configs" / "train.json"),
                   "line 1")
    assert_refused(job(tmp_path, datalists, "--target-modules", r".*blocks\.\d+\.attn\.qvk"),
                   "setting 'target_modules'", "matches no Linear/Conv module")
    assert_refused(job(tmp_path, datalists, "--rank", "0"), "setting 'rank' = 0")
    assert_refused(job(tmp_path, datalists, "--blocks", "last:9"), "setting 'blocks' = 9", "only 4 blocks")
    assert_refused(job(tmp_path, datalists, "--head", "vit.no_head"), "setting 'head' = 'vit.no_head'")
    proc = job(tmp_path, datalists, "--method", "dualora")
    assert proc.returncode == 2 and "invalid choice: 'dualora'" in proc.stderr and "Traceback" not in proc.stderr
    assert_refused(cli("job", "--target", "sim", "--bundle", CMR_BUNDLE, "--datalists", datalists, "--sites",
                       "site-a,site-x", "--allow-random-base", "--out", tmp_path / "jobs"),
                   "site site-x: datalist", "site-x.json does not exist")
    assert_refused(job(tmp_path, datalists, "--overrides", '{"hidden_size": "$1 + 31"}'), "config expressions")


def test_all_problems_are_reported_at_once(tmp_path, datalists):
    proc = cli("job", "--target", "sim", "--bundle", CMR_BUNDLE, "--datalists", datalists, "--sites",
               "site-a,site-x", "--rank", "0", "--rounds", "0", "--out", tmp_path / "jobs")
    assert_refused(proc, "setting 'rank' = 0", "setting 'num_rounds' = 0", "site site-x: datalist")
    assert len(proc.stderr.strip().splitlines()) == 3


def test_a_bundle_without_pretrained_weights_is_refused_unless_allowed(tmp_path, datalists):
    proc = cli("job", "--target", "sim", "--bundle", CMR_BUNDLE, "--datalists", datalists, "--sites",
               ",".join(SITES), "--overrides", json.dumps(TINY_CMR), "--out", tmp_path / "jobs")
    assert_refused(proc, "has no pretrained weights", "models/model.pt", "allow_random_base")
    assert job(tmp_path, datalists).returncode == 0


def test_relative_paths_resolve_where_the_job_is_built_and_are_refused_for_production(tmp_path, datalists):
    build = tmp_path / "elsewhere"
    build.mkdir()
    rel = os.path.relpath(datalists, build)
    proc = cli("job", "--target", "sim", "--bundle", CMR_BUNDLE, "--datalists", rel, "--sites", ",".join(SITES),
               "--allow-random-base", "--overrides", json.dumps(TINY_CMR), "--out", "jobs", cwd=build)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "jobs/duallora_job"
    client = json.loads((build / "jobs" / "duallora_job" / "app" / "config" / "config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"]["datalist_dir"] == str(datalists)
    proc = cli("job", "--target", "prod", "--bundle", "my_bundle", "--datalists", "data/sites", "--sites",
               ",".join(SITES), "--out", "jobs", cwd=build)
    assert_refused(proc, "setting 'bundle_root' = 'my_bundle' is a relative path",
                   "setting 'datalist_dir' = 'data/sites' is a relative path",
                   "site paths must be absolute on the site, or pkg://")
    # a production job with absolute site paths that do not exist here still builds (they are on the sites)
    proc = cli("job", "--target", "prod", "--bundle", "/data/fl/bundle", "--datalists", "/data/fl/sites", "--sites",
               ",".join(SITES), "--out", "jobs", cwd=build)
    assert proc.returncode == 0, proc.stderr


def test_the_recipe_reports_problems_as_one_error_with_every_line(datalists):
    with pytest.raises(JobCheckError) as e:
        tiny_recipe(datalists, ["site-a", "site-x"], settings={"rank": -1, "method": "nope"})
    assert any("unknown method 'nope'" in p for p in e.value.problems)
    assert any("site-x" in p for p in e.value.problems)
    with pytest.raises(JobCheckError, match="target"):
        tiny_recipe(datalists, SITES, target="cloud")


def test_every_option_has_help_with_its_default_and_method_lists_its_choices():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        text = sub.format_help()
        if any(a.dest == "method" for a in sub._actions):
            assert all(m in text for m in method_names()), name
        for action in sub._actions:
            if action.default not in (None, argparse.SUPPRESS, False) and action.option_strings:
                assert "default" in text, name


def test_the_console_script_reports_a_bad_input_without_a_traceback(tmp_path, datalists):
    exe = Path(sys.executable).with_name("flare-duallora")
    proc = subprocess.run([str(exe), "job", "--target", "sim", "--bundle", str(tmp_path / "missing"), "--datalists",
                           str(datalists), "--sites", "site-a", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert_refused(proc, "missing")
