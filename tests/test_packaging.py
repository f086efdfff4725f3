"""The release artefacts: ``python -m build`` makes a wheel and an sdist that pass ``twine check``, ship the
embedded Omniglot data and its licence, and the wheel installed into a fresh venv runs the main job.

Marked ``packaging`` (deselect with ``-m "not packaging"``); it runs by default, in CI too. Nothing is
uploaded and nothing is fetched: the build runs without isolation and pip installs with ``--no-index``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

pytest.importorskip("build")
pytest.importorskip("twine")

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
VERSION = __import__("xbn_queue").__version__
DATA = ["metric/datasets/omniglot/images_background_small1.zip", "metric/datasets/omniglot/LICENSE"]
# what a checkout may hold besides the sources (.gitignore): not copied into the build folder
UNTRACKED = (".git", "__pycache__", "*.py[cod]", "*.egg-info", "build", "dist", ".pytest_cache", ".data", "runs",
             "wandb", "outputs", ".whl", ".gl", ".benchmarks")


def _env() -> Dict[str, str]:
    """The environment without PYTHONPATH, so that nothing resolves to the checkout by accident."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: List[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> Dict[str, Path]:
    """Build the sdist and the wheel of a copy of the checkout (setuptools writes build/ and *.egg-info into
    the source folder: the checkout stays untouched)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*UNTRACKED))
    # --no-isolation: an isolated build would install setuptools into a fresh environment from the package
    # index (the network); this one uses the setuptools installed here (>= 77, pyproject's build-system).
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=tmp)
    return {"sdist": out / f"xbn_queue-{VERSION}.tar.gz", "wheel": out / f"xbn_queue-{VERSION}-py3-none-any.whl",
            "tmp": tmp}


def test_twine_check_passes_without_warnings(dists):
    proc = _run([sys.executable, "-m", "twine", "check", "--strict", dists["sdist"], dists["wheel"]], cwd=dists["tmp"])
    assert proc.stdout.count("PASSED") == 2 and "WARNING" not in proc.stdout + proc.stderr, proc.stdout


def test_wheel_and_sdist_ship_the_omniglot_data_its_licence_and_the_package_licence(dists):
    wheel = set(zipfile.ZipFile(dists["wheel"]).namelist())
    info = f"xbn_queue-{VERSION}.dist-info"
    assert set(DATA) <= wheel
    assert {f"{info}/licenses/LICENSE", f"{info}/licenses/metric/datasets/omniglot/LICENSE"} <= wheel
    assert not any(name.startswith(("tests/", "docs/", "examples/")) for name in wheel)
    with tarfile.open(dists["sdist"]) as tar:
        sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert set(DATA) | {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "MANIFEST.in"} <= sdist
    assert {"tests/test_packaging.py", "examples/pml_lightning.py", "docs/dropins.md"} <= sdist  # tests, examples, docs
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in sdist)
    metadata = zipfile.ZipFile(dists["wheel"]).read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "Description-Content-Type: text/markdown" in metadata


def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_main_job_there(dists):
    tmp = dists["tmp"]
    venv = tmp / "venv"
    # torch, PML, timm ... come from this interpreter's site-packages; only xbn-queue is installed, from the wheel
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp)
    python, script = venv / "bin" / "python", venv / "bin" / "xbn-metric"
    if sys.platform == "win32":  # pragma: no cover
        python, script = venv / "Scripts" / "python.exe", venv / "Scripts" / "xbn-metric.exe"
    # --force-reinstall: an editable install of the checkout in the system site-packages is not this venv's
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "--quiet", dists["wheel"]],
         cwd=tmp)
    where = _run([python, "-c", "import xbn_queue, metric.data as d; print(xbn_queue.__file__); "
                  "print(d.__file__); print(d.OMNIGLOT_EMBEDDED)"], cwd=tmp).stdout.split()
    site = (venv / "lib").resolve()
    assert len(where) == 3 and all(Path(p).resolve().is_relative_to(site) for p in where), where
    # the main job (xbn-metric compare on the embedded Omniglot), as small as it goes: one method, one seed,
    # two training steps, then the evaluation on the held-out alphabets and the table
    out = tmp / "mainjob"
    _run([script, "compare", "--dataset", "omniglot", "--methods", "xbn", "--seeds", "1", "--epochs", "1",
          "--max-steps", "2", "--output-dir", out], cwd=tmp, timeout=600)
    table = (out / "compare.md").read_text()
    assert "| XBN |" in table and "| Raw pixels |" in table
