"""What a run prints at its end: which model did better at each site, the privacy budget, the map pointer."""

from types import SimpleNamespace
from pathlib import Path

from flare_duallora.deploy.report import MAP_POINTER, comparison_lines, privacy_lines, results_report

PRIVACY = {"epsilon": 1.234, "delta": 1e-5, "unit": "subject", "target_epsilon": 3.0, "noise_multiplier": 1.1,
           "steps": 40, "accountant": "rdp"}
RESULTS = {
    "site-a": {"personalised": {"balanced_accuracy": 0.70, "n": 10}, "global_only": {"balanced_accuracy": 0.60}},
    "site-b": {"personalised": {"balanced_accuracy": 0.55, "n": 8}, "global_only": {"balanced_accuracy": 0.65},
               "privacy": PRIVACY},
    "site-c": {"error": "site-c: FileNotFoundError: ..."},
}


def test_each_site_says_which_model_did_better_on_its_own_validation_data():
    lines = comparison_lines(RESULTS)
    assert lines == ["site-a: the personalised model did better (balanced_accuracy 0.700 personalised, "
                     "0.600 global-only)",
                     "site-b: the global-only model did better (balanced_accuracy 0.550 personalised, "
                     "0.650 global-only)"]
    seg = {"s": {"personalised": {"dice": 0.8, "hd95": 3.0}, "global_only": {"dice": 0.8, "hd95": 4.0}}}
    assert comparison_lines(seg) == ["s: both models did the same (dice 0.800 personalised, 0.800 global-only)"]


def test_the_report_names_the_budget_each_site_spent_and_points_at_the_map():
    assert privacy_lines(RESULTS) == ["site-b: (1.23, 1e-05)-DP per subject (target epsilon 3, noise multiplier "
                                      "1.1, 40 steps, rdp)"]
    result = SimpleNamespace(site_results=RESULTS, site_records={},
                             outputs=SimpleNamespace(server_dir=Path("ws/server")))
    text = results_report(result, "Per-site results of duallora")
    assert MAP_POINTER in text and "site-b: (1.23, 1e-05)-DP" in text and "| site-c | - | failed |" in text
    assert text.index("did better") < text.index("-DP per subject") < text.index("results: ")


def test_template_settings_may_follow_the_options_as_the_template_readme_writes_them():
    """job_templates/README.md: ``template create T DIR --target sim --sites a,b k=v ...`` (settings after options)."""
    import pytest

    from flare_duallora.cli import parse_args

    args = parse_args(["template", "create", "duallora_cmr3d", "jobs/cmr", "--target", "sim", "--sites", "a,b",
                       "datalist_dir=data/sites", "bundle_root=my_bundle", "num_rounds=10"])
    assert args.settings == ["datalist_dir=data/sites", "bundle_root=my_bundle", "num_rounds=10"]
    assert args.target == "sim" and args.job_dir == "jobs/cmr"
    with pytest.raises(SystemExit):
        parse_args(["job", "--target", "sim", "--no-such-option"])
    with pytest.raises(SystemExit):
        parse_args(["template", "create", "t", "d", "--target", "sim", "--bogus"])
