"""Run folders written before the options of issue 23 existed are still finished runs for compare / sweep."""

import json

import torch
import yaml

from metric.cli import main
from metric.config import COMPAT_DEFAULTS

from .helpers import tiny_argv


#: Options of issue 23, named here so that a missing COMPAT_DEFAULTS entry fails this test.
NEW_KEYS = {"omniglot_rotations", "loss", "loss_args", "miner", "miner_args"}


def _as_written_before(folder) -> None:
    """Remove every option added after 0.1 (COMPAT_DEFAULTS and the new ones) from a run's checkpoints and config.yaml."""
    gone = set(COMPAT_DEFAULTS) | NEW_KEYS
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(folder / name, map_location="cpu", weights_only=False)
        for key in gone:
            ckpt["config"].pop(key, None)
        torch.save(ckpt, folder / name)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k not in gone}))


def test_compare_rerun_on_old_run_folders_only_renders(tmp_path, capsys):
    argv = ["compare", *tiny_argv(tmp_path, drift_every=0), "--methods", "none,xbm,xbn", "--seeds", "1"]
    assert main(argv) == 0
    table = (tmp_path / "compare.md").read_text()
    result = json.loads((tmp_path / "compare.json").read_text())
    runs = {r["method"]: r for r in result["runs"]}
    for base, name in (("xbm", "XBM"), ("none", "No-XBM")):  # the paired-gain table, from the runs' own scores
        gain = result["gains"]["xbn"][base]["recall@1"]
        assert gain == {"mean": runs["xbn"]["recall@1"] - runs[base]["recall@1"], "std": 0.0, "n": 1}
        assert f"| XBN − {name} | " in table
    assert "| XBN − XBM* |" not in table
    for method in ("none", "xbm", "xbn"):
        _as_written_before(tmp_path / f"{method}-seed0")
        saved = torch.load(tmp_path / f"{method}-seed0" / "last.pt", map_location="cpu", weights_only=False)["config"]
        assert "omniglot_rotations" not in saved and "prefill" not in saved
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*-seed0/*") if p.is_file()}
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("is already complete") == 3, err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*-seed0/*") if p.is_file()} == before
    assert (tmp_path / "compare.md").read_text() == table
    assert all(r["complete"] for r in json.loads((tmp_path / "compare.json").read_text())["runs"])
