"""The README's "From the command line" block, typed verbatim into bash in an empty folder, learns on its own
cohort: the per-site table `simulate` prints shows a personalised balanced accuracy above chance at every vendor site.
It is the whole block, not a shortened form (about 6 minutes on 2 CPU cores, most of it the MAE pretraining)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-siemens", "site-philips", "site-ge", "site-canon")


def readme_block(after: str) -> str:
    """The first ```bash block after the line ``after`` in the README, as the README writes it."""
    text = (ROOT / "README.md").read_text()
    m = re.search(re.escape(after) + r".*?```bash\n(.*?)\n```", text, re.S)
    assert m, f"README.md: no bash block after {after!r}"
    return m.group(1)


def test_the_block_runs_the_plugins_own_commands():
    block = readme_block("### From the command line")
    commands = [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith("NET=")]
    assert set(commands) == {"flare-duallora"}, commands
    assert "simulate" in block and "--clients site-siemens,site-philips,site-ge,site-canon" in block


@pytest.mark.slow
def test_the_readme_command_line_block_verbatim_learns_at_every_site(tmp_path):
    block = readme_block("### From the command line")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for site in SITES:
        row = re.search(rf"^\| {site} \| (\d+) \| personalised \| ([0-9.]+) \|", out, re.M)
        assert row, f"no personalised row for {site} in:\n{out[-3000:]}"
        assert int(row.group(1)) > 0 and float(row.group(2)) > 0.5, (site, row.group(0))
