"""``xbn-metric embed / search``: the store, the faiss indexes, the k-NN vote, the pictures, bad input."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from metric.cli import main  # noqa: E402
from metric.retrieval import build_index, knn_vote, load_index, open_store, search  # noqa: E402
from xbn_queue.training.tracking import read_metrics  # noqa: E402

from .conftest import make_folder, write_image  # noqa: E402


def _exit_code(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


@pytest.fixture(scope="module")
def digits_store(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "digits"
    assert main(["embed", str(run[0]), "--out", str(out)]) == 0
    return out


@pytest.fixture
def folder_store(run, tmp_path):
    """A store of a plain image folder (6 classes x 4 PNGs; sub-folder names are the labels)."""
    root = make_folder(tmp_path / "images")
    out = tmp_path / "store"
    assert main(["embed", str(run[0]), "--dataset", "images", "--data-root", str(root), "--out", str(out)]) == 0
    return root, out


def plain_knn(emb: np.ndarray, labels, k: int):
    """Leave-one-out k-NN class vote written plainly: float64 similarities, majority, tie -> better rank."""
    e = emb.astype(np.float64)
    preds = []
    for i in range(len(e)):
        sims = [(float(e[i] @ e[j]), j) for j in range(len(e)) if j != i]
        sims.sort(key=lambda t: -t[0])
        nbrs = [labels[j] for _, j in sims[:k]]
        counts = {}
        for lab in nbrs:
            counts[lab] = counts.get(lab, 0) + 1
        top = max(counts.values())
        preds.append(next(lab for lab in nbrs if counts[lab] == top))
    return preds


def test_search_top1_is_the_runs_recall_at_1_and_predict_is_plain_knn(run, digits_store, tmp_path):
    out_dir, res = run
    best = max((r for r in read_metrics(out_dir / "metrics.jsonl") if "recall@1" in r), key=lambda r: r["recall@1"])
    assert best["recall@1"] == res["best"]["recall@1"]
    store = open_store(digits_store)
    assert store.meta["split"] == "test" and len(store) == 899  # the run's held-out half, leave-one-out
    results = tmp_path / "res.json"
    assert main(["search", str(digits_store), "--query", str(digits_store), "--k", "5", "--predict",
                 "--out", str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["leave_one_out"] and got["k"] == 5
    assert all(e["query"] not in [n["item"] for n in e["neighbours"]] for e in got["results"])
    hits = sum(e["neighbours"][0]["label"] == e["query_label"] for e in got["results"])
    assert hits == round(best["recall@1"] * 899)  # the same number computed two ways
    assert got["top1_accuracy"] == pytest.approx(best["recall@1"], abs=1e-12)
    preds = plain_knn(np.asarray(store.embeddings), store.labels, 5)
    assert [e["prediction"]["label"] for e in got["results"]] == preds
    truth = store.labels
    assert got["knn_accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(preds, truth)]), abs=1e-12)
    print(f"top-1 {got['top1_accuracy']:.4f} = run Recall@1 {best['recall@1']:.4f}; 5-NN accuracy {got['knn_accuracy']:.4f}")


def _plain_recall_at_1(emb: np.ndarray, labels):
    """Leave-one-out Recall@1 written plainly (float64): queries without a positive left out, ties against the query."""
    e = emb.astype(np.float64)
    hits = valid = 0
    for i in range(len(e)):
        pos = [float(e[i] @ e[j]) for j in range(len(e)) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        valid += 1
        neg = [float(e[i] @ e[j]) for j in range(len(e)) if labels[j] != labels[i]]
        hits += max(pos) > max(neg)
    return hits / valid, len(e) - valid


@pytest.mark.parametrize("k", [1, 4])
def test_search_top1_follows_recall_at_1_with_a_query_without_positive_and_an_exact_tie(digits_store, tmp_path, k):
    """A store changed so that one query has no positive and three rows are the same vector (2 of one label, 1 of another)."""
    import csv

    from metric.evaluate import retrieval_metrics

    store = tmp_path / "store"
    shutil.copytree(digits_store, store, ignore=shutil.ignore_patterns("index-*"))
    emb = np.array(np.load(store / "embeddings.npy"))  # (899, D)
    with open(store / "items.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = [r["label"] for r in rows]
    # Two triples of equal rows, two of a label and one of another: one negative after its positives, one before
    # them, so that faiss (whatever its order among equal scores) lists a positive first for some tied query.
    p = next(i for i in range(1, len(labels)) if labels[i] == labels[0])
    n = next(i for i in range(p + 1, len(labels)) if labels[i] != labels[0])
    m = next(i for i in range(n + 1, len(labels)) if labels[i] != labels[0])
    x = next(i for i in range(m + 1, len(labels)) if labels[i] not in (labels[0], labels[m]))
    y = next(i for i in range(x + 1, len(labels)) if labels[i] == labels[x])
    emb[p] = emb[n] = emb[0]  # rows 0, p (label a) and n (label b): the same similarities to every row
    emb[x] = emb[y] = emb[m]  # rows x, y (label c) and m before them (label d)
    lone = next(i for i in range(len(labels)) if i not in (0, p, n, m, x, y))
    labels[lone] = rows[lone]["label"] = "only-one"  # a labelled query without a positive
    np.save(store / "embeddings.npy", emb)
    with open(store / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "item", "label"])
        w.writerows([r["row"], r["item"], r["label"]] for r in rows)

    results = tmp_path / "res.json"
    assert main(["search", str(store), "--query", str(store), "--k", str(k), "--out", str(results)]) == 0
    got = json.loads(results.read_text())
    ref, without = _plain_recall_at_1(emb, labels)
    ids = {lab: i for i, lab in enumerate(sorted(set(labels)))}
    lab_t = torch.tensor([ids[lab] for lab in labels])
    evaluated = retrieval_metrics(torch.from_numpy(emb), lab_t, ks=(1,), map_at_r=False)  # the trainer's Recall@1
    assert without == evaluated["queries_without_positive"] == got["queries_without_positive"] == 1
    assert evaluated["recall@1"] == pytest.approx(ref, abs=1e-12)
    assert got["top1_accuracy"] == pytest.approx(ref, abs=1e-12)
    # the tied rows are misses (the references say so) although faiss lists a positive first for some of them
    top1_of = {e["query"]: e["neighbours"][0]["label"] for e in got["results"]}
    assert sum(top1_of[rows[i]["item"]] == labels[i] for i in (0, p, x, y)) >= 1


def test_knn_vote_majority_tie_to_better_rank_unlabelled_ignored():
    assert knn_vote(["a", "b", "b", "a", "c"]) == ("a", 0.4, 2)  # a and b tie at 2: a is ranked first
    assert knn_vote(["c", "b", "b"]) == ("b", pytest.approx(2 / 3), 2)
    assert knn_vote(["", "x", ""]) == ("x", 1.0, 1)
    assert knn_vote(["", ""]) == (None, 0.0, 0)


def test_ivf_searching_every_cluster_and_hnsw_equal_the_exact_index(digits_store):
    store = open_store(digits_store)
    x = np.asarray(store.embeddings)
    exact = search(build_index(x, "flat"), x[:50], 10)
    ivf = build_index(x, "ivf", nlist=8)
    approx = search(ivf, x[:50], 10, nprobe=8)  # every cluster searched: exhaustive
    np.testing.assert_array_equal(approx.rows, exact.rows)
    np.testing.assert_allclose(approx.scores, exact.scores, rtol=0, atol=1e-5)
    hnsw = search(build_index(x, "hnsw"), x[:50], 10, ef_search=899)
    assert (hnsw.rows == exact.rows).mean() > 0.99
    ref = np.sort(x[:50].astype(np.float64) @ x.T.astype(np.float64), axis=1)[:, ::-1][:, :10]  # float64 reference
    np.testing.assert_allclose(exact.scores, ref, rtol=0, atol=1e-5)


def test_index_is_saved_beside_the_store_and_reused(digits_store):
    store = open_store(digits_store)
    for f in digits_store.glob("index-ivf*"):
        f.unlink()
    first = load_index(store, "ivf")
    saved = digits_store / "index-ivf.faiss"
    stamp = saved.stat().st_mtime_ns
    again = load_index(open_store(digits_store), "ivf")
    assert saved.stat().st_mtime_ns == stamp and again.ntotal == first.ntotal == len(store)
    assert json.loads((digits_store / "index-ivf.json").read_text())["store_id"] == store.meta["id"]


def test_update_embeds_only_new_images_and_extends_the_index(run, folder_store, tmp_path):
    root, out = folder_store
    assert main(["search", str(out), "--query", str(root / "ant" / "000.png"), "--index", "hnsw", "--k", "3",
                 "--out", str(tmp_path / "a.json")]) == 0
    before = open_store(out)
    new = [root / "gnu" / "000.png", root / "gnu" / "001.png", root / "ant" / "new.png"]
    for i, p in enumerate(new):
        write_image(p, 900 + i, size=(16, 16))
    assert main(["embed", str(run[0]), "--update", "--out", str(out)]) == 0
    after = open_store(out)
    assert after.items[: len(before)] == before.items and len(after) == len(before) + 3
    assert sorted(after.items[len(before):]) == sorted(p.relative_to(root).as_posix() for p in new)
    np.testing.assert_array_equal(np.asarray(after.embeddings)[: len(before)], np.asarray(before.embeddings))
    fresh = tmp_path / "fresh"
    assert main(["embed", str(run[0]), "--dataset", "images", "--data-root", str(root), "--out", str(fresh)]) == 0
    ref = open_store(fresh)
    order = [ref.items.index(k) for k in after.items]
    np.testing.assert_allclose(np.asarray(after.embeddings), np.asarray(ref.embeddings)[order], rtol=0, atol=1e-6)
    assert [ref.labels[i] for i in order] == after.labels
    assert load_index(after, "hnsw").ntotal == len(after)  # extended, and it matches its store
    assert main(["embed", str(run[0]), "--update", "--out", str(out)]) == 0  # nothing new: nothing written
    assert open_store(out).meta["updated"] == after.meta["updated"]


def test_html_and_sheet_frame_neighbours_by_label(folder_store, tmp_path):
    root, out = folder_store
    page, sheet, res = tmp_path / "p.html", tmp_path / "s.png", tmp_path / "r.csv"
    assert main(["search", str(out), "--query", str(root), "--k", "4", "--html", str(page), "--sheet", str(sheet),
                 "--show", "5", "--out", str(res)]) == 0
    rows = [line.split(",") for line in res.read_text().splitlines()[1:]]
    queries = list(dict.fromkeys(r[0] for r in rows))
    shown = [queries[i] for i in np.linspace(0, len(queries) - 1, 5).round().astype(int)]  # evenly spaced
    same = sum(r[1] == r[4] for r in rows if r[0] in shown)
    text = page.read_text()
    assert 0 < same < 5 * 4 and text.count("data:image/png;base64,") == 5 * 5
    assert text.count("rgb(30,160,60)") == same and text.count("rgb(210,40,40)") == 5 * 4 - same
    from PIL import Image

    im = Image.open(sheet)
    assert im.size[1] > 5 * 96 and im.getpixel((8, 8)) == (40, 90, 200)  # the first query's blue frame


def test_query_of_another_size_and_mode_works(folder_store, tmp_path):
    from PIL import Image

    _, out = folder_store
    q = tmp_path / "q"
    q.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (23, 37), dtype=np.uint8), mode="L").save(q / "grey.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 9, 4), dtype=np.uint8), mode="RGBA").save(q / "rgba.png")
    res = tmp_path / "r.json"
    assert main(["search", str(out), "--query", str(q), "--k", "3", "--predict", "--out", str(res)]) == 0
    got = json.loads(res.read_text())["results"]
    assert [e["query"] for e in got] == ["grey.png", "rgba.png"] and all(len(e["neighbours"]) == 3 for e in got)


# ------------------------------------------------------------------------------------------ bad input
def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("xbn-metric: error:"), err
    assert all(w in err[-1] for w in words), err[-1]
    return err[-1]


def test_unreadable_image_named_or_skipped(run, tmp_path, capsys):
    root = make_folder(tmp_path / "images", classes=("ant", "bee"), per_class=2)
    (root / "bee" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "store"
    assert _exit_code(["embed", run[0], "--dataset", "images", "--data-root", root, "--out", out]) == 2
    _one_line_error(capsys, "bee/broken.png", "--skip-bad-images")
    assert not out.exists()
    assert _exit_code(["embed", run[0], "--dataset", "images", "--data-root", root, "--out", out,
                       "--skip-bad-images"]) == 0
    store = open_store(out)
    assert len(store) == 4 and "bee/broken.png" not in store.items and store.meta["skipped"] == ["bee/broken.png"]
    assert "skipping unreadable image bee/broken.png" in capsys.readouterr().err


def test_empty_folder_refused(run, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert _exit_code(["embed", run[0], "--dataset", "images", "--data-root", tmp_path / "empty", "--out",
                       tmp_path / "s"]) == 2
    _one_line_error(capsys, "--data-root", "no images")
    assert not (tmp_path / "s").exists()
    assert _exit_code(["search", tmp_path / "empty", "--query", tmp_path / "empty"]) == 2
    _one_line_error(capsys, "not an embedding store")


def test_an_empty_query_folder_names_the_query_option(digits_store, tmp_path, capsys):
    (tmp_path / "noimg").mkdir()
    assert _exit_code(["search", digits_store, "--query", tmp_path / "noimg"]) == 2
    _one_line_error(capsys, "--query", "no images")


def _other_checkpoint(run, tmp_path):
    """A copy of the run's checkpoint with one weight changed: another model of the same architecture."""
    ckpt = torch.load(run[0] / "best.pt", map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] + 0.5
    path = tmp_path / "other.pt"
    torch.save(ckpt, path)
    return path


def test_store_of_another_model_or_dimension_refused(run, folder_store, tmp_path, capsys):
    root, out = folder_store
    other = _other_checkpoint(run, tmp_path)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _exit_code(["embed", other, "--update", "--out", out]) == 2
    _one_line_error(capsys, str(out), "another model")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert _exit_code(["search", out, "--query", root / "ant", "--run", other, "--out", tmp_path / "r.json"]) == 2
    _one_line_error(capsys, "another model")
    q2 = tmp_path / "q2"
    assert _exit_code(["embed", other, "--dataset", "images", "--data-root", root, "--out", q2]) == 0
    assert _exit_code(["search", out, "--query", q2, "--out", tmp_path / "r.json"]) == 2
    _one_line_error(capsys, "--query", "another model")
    meta = json.loads((q2 / "store.json").read_text())  # the same store cut to dimension 16
    np.save(q2 / "embeddings.npy", np.load(q2 / "embeddings.npy")[:, :16])
    (q2 / "store.json").write_text(json.dumps(dict(meta, embedding_dim=16)))
    assert _exit_code(["search", out, "--query", q2, "--out", tmp_path / "r.json"]) == 2
    _one_line_error(capsys, "--query", "dimension 16")
    assert not (tmp_path / "r.json").exists()


def test_index_that_does_not_match_its_store_refused(run, folder_store, digits_store, tmp_path, capsys):
    root, out = folder_store
    load_index(open_store(digits_store), "flat")
    for suffix in ("faiss", "json"):
        shutil.copy(digits_store / f"index-flat.{suffix}", out / f"index-flat.{suffix}")
    assert _exit_code(["search", out, "--query", root / "ant", "--out", tmp_path / "r.json"]) == 2
    msg = _one_line_error(capsys, "index file", "index-flat.faiss", "does not match its store")
    assert re.search(r"899 vectors .* the store has 24 rows", msg)
    assert not (tmp_path / "r.json").exists()
    assert _exit_code(["embed", run[0], "--update", "--out", out]) == 0  # nothing new: the index is not touched
    write_image(root / "ant" / "late.png", 77, size=(16, 16))
    assert _exit_code(["embed", run[0], "--update", "--out", out]) == 2
    _one_line_error(capsys, "does not match its store")
    assert "ant/late.png" not in open_store(out).items


def test_k_policy_and_outputs(folder_store, tmp_path, capsys):
    root, out = folder_store
    assert _exit_code(["search", out, "--query", root / "ant" / "000.png", "--k", "0"]) == 2
    _one_line_error(capsys, "--k 0", ">= 1")
    res = tmp_path / "r.json"
    assert _exit_code(["search", out, "--query", out, "--k", "100", "--out", res]) == 0
    assert "--k 100 is more than the 23 gallery items (leave-one-out): using --k 23" in capsys.readouterr().err
    assert all(len(e["neighbours"]) == 23 for e in json.loads(res.read_text())["results"])
    assert _exit_code(["search", out, "--query", out, "--out", res]) == 2
    _one_line_error(capsys, "--out", "exists", "--overwrite")
    assert _exit_code(["search", out, "--query", out, "--out", res, "--overwrite", "--k", "2"]) == 0
    assert json.loads(res.read_text())["k"] == 2
    assert _exit_code(["search", out, "--query", out, "--out", tmp_path / "r.txt"]) == 2
    _one_line_error(capsys, "--out", ".json or .csv")
    assert _exit_code(["embed", "unused", "--out", out]) == 2  # a store is never replaced without --overwrite
    _one_line_error(capsys, "already holds a store")


def test_predict_needs_gallery_labels(run, tmp_path, capsys):
    root = tmp_path / "flat"
    for i in range(3):
        write_image(root / f"{i}.png", i)
    out = tmp_path / "store"
    assert main(["embed", str(run[0]), "--dataset", "images", "--data-root", str(root), "--out", str(out)]) == 0
    assert _exit_code(["search", out, "--query", root / "0.png", "--predict"]) == 2
    _one_line_error(capsys, "--predict", "no labels")


def test_help_of_each_command(capsys):
    for cmd, words in (("embed", ["--update", "--data-root", "store.json"]), ("search", ["--predict", "--index", "clamped"]),
                       ("export", ["torchscript", "onnx", "metadata"])):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert all(w in text for w in words), (cmd, text)


def test_a_run_on_the_tensor_cache_is_embedded_as_it_was_evaluated(tmp_path):
    """A run evaluated through the in-memory cache: its store repeats that preprocessing (top-1 = Recall@1)."""
    from metric.config import resolve_config
    from metric.train import train

    from .helpers import tiny_cfg

    out = tmp_path / "run"
    res = train(resolve_config(tiny_cfg(out, method="xbn", epochs=1, warmup_epochs=0, augment="mild", drift_every=0)))
    store = tmp_path / "store"
    assert main(["embed", str(out), "--out", str(store), "--no-progress"]) == 0
    results = tmp_path / "res.json"
    assert main(["search", str(store), "--query", str(store), "--k", "1", "--out", str(results)]) == 0
    got = json.loads(results.read_text())
    assert got["top1_accuracy"] == pytest.approx(res["best"]["recall@1"], abs=1e-12)
    from metric.retrieval import load_run_model

    assert load_run_model(out, "cpu").files_cached  # recorded in the checkpoint's meta


def test_a_folder_run_on_the_tensor_cache_embeds_its_files_as_it_evaluated_them(run, tmp_path):
    """A run on an image folder evaluated through the tensor cache (files decoded once): embedding the same
    files again decodes them as that cache did, so the store's top-1 is the run's Recall@1 exactly; a run that
    evaluated through its transform (the shared digits run, timm augmentation) records that it did not."""
    from metric.config import resolve_config
    from metric.retrieval import load_run_model
    from metric.train import train

    from .conftest import make_folder
    from .helpers import tiny_cfg

    root = make_folder(tmp_path / "images", with_train_test=True)
    out = tmp_path / "run"
    cfg = tiny_cfg(out, dataset="folder", data_root=str(root), split="auto", method="xbm", epochs=1, warmup_epochs=0,
                   augment="mild", drift_every=0, batch_size=8, memory_size="16", image_size=16, probe_size=8,
                   backbone="tinycnn", pretrained=False)
    res = train(resolve_config(cfg))
    assert load_run_model(out, "cpu").files_cached and not load_run_model(run[0], "cpu").files_cached
    store, results = tmp_path / "store", tmp_path / "res.json"
    assert main(["embed", str(out), "--out", str(store), "--no-progress"]) == 0
    assert main(["search", str(store), "--query", str(store), "--k", "1", "--out", str(results)]) == 0
    assert json.loads(results.read_text())["top1_accuracy"] == pytest.approx(res["best"]["recall@1"], abs=1e-12)
    # the store holds the model's embeddings of the cache's evaluation tensors of the same files
    from metric.data import load_dataset
    from metric.fastdata import TensorCache

    lm, data = load_run_model(out, "cpu"), load_dataset("folder", str(root), "auto")
    cache = TensorCache.build(data, 16, torch.device("cpu"))
    with torch.no_grad():
        want = lm.model(cache.query.batch(torch.arange(len(data.query)))).numpy()
    torch.testing.assert_close(torch.from_numpy(np.load(store / "embeddings.npy")), torch.from_numpy(want))

