import json
from dataclasses import replace
from pathlib import Path

import pytest

from selfsup.cli import main
from selfsup.compare import compare, format_table, summarize, summarize_final
from selfsup.data import load_dataset
from tests.selfsup.conftest import CIFAR_TAR, REPO, tiny_config

TINY = ["--dataset", "digits", "--image-size", "16", "--train-subset", "128", "--test-subset", "60", "--width", "8",
        "--batch-size", "32", "--split-bn", "2", "--queue-size", "96", "--knn-k", "10", "--device", "cpu",
        "--no-progress", "--threads", "1"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_cli_trains_with_and_without_subcommand_and_reuses_saved_config(tmp_path, capsys):
    assert main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path / "a")]) == 0
    assert "recipe: MoCo (Appendix B) with resnet18 width 8" in capsys.readouterr().err
    assert main(["train"] + TINY + ["--epochs", "1", "--output-dir", str(tmp_path / "b")]) == 0
    ra, rb = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb] and "knn_acc" in ra[-1]
    # the resolved config.yaml re-runs the same thing
    assert main(["--config", str(tmp_path / "a" / "config.yaml"), "--output-dir", str(tmp_path / "c")]) == 0
    assert [r["loss"] for r in read_jsonl(tmp_path / "c" / "metrics.jsonl")] == [r["loss"] for r in ra]


def test_cli_reports_missing_data_and_bad_options(tmp_path, capsys):
    assert main(["--dataset", "cifar10", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "cifar10 not found" in capsys.readouterr().err
    assert main(TINY + ["--batch-size", "30", "--split-bn", "4", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--batch-size 30: expected a multiple of --split-bn 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--adaptation", "bogus"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_compare_writes_mean_and_std_per_epoch(tmp_path):
    cfg = tiny_config(tmp_path, train_subset=128, epochs=2)
    data = load_dataset("digits", "", image_size=16, train_subset=128, test_subset=100)
    result = compare(cfg, ["none", "xbn"], seeds=2, data=data)
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "compare.json").is_file()
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["adaptations"] == ["none", "xbn"]
    for a in ("none", "xbn"):
        per_seed = []
        for s in (0, 1):
            rec = [r for r in read_jsonl(tmp_path / f"{a}-seed{s}" / "metrics.jsonl") if "knn_acc" in r]
            assert [r["epoch"] for r in rec] == [1.0, 2.0]
            per_seed.append(rec[-1]["knn_acc"])
        mean = sum(per_seed) / 2
        std = (sum((v - mean) ** 2 for v in per_seed)) ** 0.5  # n - 1 = 1
        assert saved["summary"][a]["2"]["mean"] == pytest.approx(mean)
        assert saved["summary"][a]["2"]["std"] == pytest.approx(std)
        assert saved["summary"][a]["2"]["n"] == 2
        # last and best epoch, from the per-seed histories
        histories = [{r["epoch"]: r["knn_acc"] for r in read_jsonl(tmp_path / f"{a}-seed{s}" / "metrics.jsonl")
                      if "knn_acc" in r} for s in (0, 1)]
        best = [max(h.values()) for h in histories]
        final = saved["final"][a]
        assert final["last"]["mean"] == pytest.approx(mean) and final["last"]["n"] == 2
        assert final["best"]["mean"] == pytest.approx(sum(best) / 2)
        assert final["best"]["std"] == pytest.approx(abs(best[0] - best[1]) / 2 ** 0.5)
        assert [h[e] for h, e in zip(histories, final["best_epochs"])] == best
    assert saved["knn_features"] == "head"
    md = (tmp_path / "compare.md").read_text()
    assert "| epoch | none k-NN acc (%) | xbn k-NN acc (%) |" in md and "(n=2)" in md
    assert "| adaptation | last epoch k-NN acc (%) | best epoch k-NN acc (%) | best at epoch |" in md
    assert "k-NN accuracy on head features" in md
    assert result["markdown"] == md
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert result["complete"] and all(result["run_complete"].values()) and result["exit_code"] == 0
    # running it again is refused; with --resume every finished run is kept instead of retrained
    from xbn_queue.training.cli import UsageError

    with pytest.raises(UsageError, match="already holds a run"):
        compare(cfg, ["none", "xbn"], seeds=2, data=data)
    again = compare(replace(cfg, resume="auto"), ["none", "xbn"], seeds=2, data=data)
    assert again["summary"] == result["summary"]


def test_last_and_best_epoch_per_adaptation():
    runs = {"none": {0: {1.0: 0.5, 2.0: 0.6, 3.0: 0.55}, 1: {1.0: 0.7, 2.0: 0.7, 3.0: 0.65}}, "xbn": {0: {1.0: 0.6}}}
    final = summarize_final(runs)
    assert final["none"]["best_epochs"] == [2.0, 1.0]  # seed 1 ties at epochs 1 and 2: the earlier one
    assert final["none"]["last"]["mean"] == pytest.approx(0.6) and final["none"]["last"]["std"] == pytest.approx(0.0707106781)
    assert final["none"]["best"]["mean"] == pytest.approx(0.65) and final["none"]["best"]["n"] == 2
    assert final["xbn"] == {"last": {"mean": 0.6, "std": 0.0, "n": 1}, "best": {"mean": 0.6, "std": 0.0, "n": 1},
                            "best_epochs": [1.0]}
    table = format_table(summarize(runs), "title", final)
    assert "| none | 60.00 +- 7.07 (n=2) | 65.00 +- 7.07 | 2, 1 |" in table
    assert "| xbn | 60.00 (n=1) | 60.00 | 1 |" in table
    assert "on the test split itself" in table and "last epoch" not in format_table(summarize(runs))


def test_a_resumed_comparison_keeps_the_monitor_of_its_runs(tmp_path):
    """compare --resume of a comparison whose runs were monitored on backbone features (explicitly, or by a
    release before --knn-features) continues every run, started or not, on backbone features."""
    from xbn_queue.training.checkpoint import atomic_save
    from xbn_queue.training.series import PlannedRun

    from selfsup.compare import series_knn_features

    plan = [PlannedRun(f"{a}-seed0", {"adaptation": a, "seed": 0}) for a in ("none", "xbn")]
    cfg = tiny_config(tmp_path, knn_features=None)
    assert series_knn_features(cfg, tmp_path, plan, resume=True) == "head"  # nothing trained yet
    (tmp_path / "xbn-seed0").mkdir()
    atomic_save({"config": {"knn_features": "backbone"}}, tmp_path / "xbn-seed0" / "last.pt")
    assert series_knn_features(cfg, tmp_path, plan, resume=True) == "backbone"  # none-seed0 has not started
    assert series_knn_features(cfg, tmp_path, plan, resume=False) == "head"
    assert series_knn_features(replace(cfg, knn_features="head"), tmp_path, plan, resume=True) == "head"
    atomic_save({"config": {"adaptation": "none"}}, tmp_path / "xbn-seed0" / "last.pt")  # before the option
    assert series_knn_features(cfg, tmp_path, plan, resume=True) == "backbone"


def test_summarize_and_format_table():
    s = summarize({"none": {0: {1.0: 0.5}, 1: {1.0: 0.7}}, "xbn": {0: {1.0: 0.6}}})
    assert s["none"][1.0]["mean"] == pytest.approx(0.6) and s["none"][1.0]["std"] == pytest.approx(0.1414213562)
    assert s["xbn"][1.0] == {"mean": 0.6, "std": 0.0, "n": 1}
    assert "| 1 | 60.00 +- 14.14 (n=2) | 60.00 (n=1) |" in format_table(s)  # one seed: no "+- 0.00"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"real CIFAR-10 JPEGs not present ({CIFAR_TAR})")
def test_short_run_on_real_cifar10_jpegs(tmp_path):
    import subprocess

    root = REPO / ".data" / "cifar10"
    if not (root / "train" / "airplane").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(CIFAR_TAR), "-C", str(root)], check=True)
    argv = ["--dataset", "folder", "--data-root", str(root), "--train-subset", "512", "--test-subset", "200",
            "--knn-bank-subset", "512", "--width", "8", "--batch-size", "64", "--queue-size", "256", "--epochs", "1",
            "--knn-k", "20", "--device", "cpu", "--no-progress", "--threads", "1", "--output-dir", str(tmp_path),
            "--linear-probe", "--probe-epochs", "30"]  # the probe on real features: no second run (suite time)
    assert main(argv) == 0
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    assert 0.1 <= rec[-1]["knn_acc"] <= 1.0  # 10 classes
    assert 0.15 <= rec[-1]["probe_acc_backbone"] <= 1.0  # chance 0.1 (200 test images: std 0.021)
    assert rec[-1]["step"] == 8
