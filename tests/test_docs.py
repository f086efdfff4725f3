"""The documentation stays consistent: every relative link resolves, the API page matches the docstrings."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "docs" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_every_relative_link_resolves():
    res = _run("check_links.py")
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_api_page_is_generated_from_the_current_docstrings():
    res = _run("gen_api.py", "--check")
    assert res.returncode == 0, res.stdout + res.stderr + "\nrun: python docs/gen_api.py"


def test_the_import_graph_in_design_md_is_current():
    res = _run("gen_import_graph.py", "--check")
    assert res.returncode == 0, res.stdout + res.stderr + "\nrun: python docs/gen_import_graph.py"
