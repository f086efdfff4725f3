import pytest
import torch
import torch.nn.functional as F

from selfsup.knn import knn_accuracy, knn_predict


def reference_knn(queries, bank, labels, num_classes, k, t):
    """Plain float64 weighted k-NN: loops, full sort, exp(s / t) votes."""
    q = queries.double()
    b = bank.double()
    preds = []
    for i in range(q.shape[0]):
        sims = [(float(q[i] @ b[j]), j) for j in range(b.shape[0])]
        sims.sort(key=lambda p: -p[0])
        votes = [0.0] * num_classes
        for s, j in sims[: min(k, b.shape[0])]:
            votes[int(labels[j])] += torch.exp(torch.tensor(s / t, dtype=torch.float64)).item()
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,t", [(1, 0.1), (5, 0.1), (20, 0.5), (500, 0.07)])
def test_knn_matches_bruteforce_reference(k, t):
    g = torch.Generator().manual_seed(k)
    bank = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (60,), generator=g)
    queries = F.normalize(torch.randn(25, 8, generator=g), dim=1)
    ours = knn_predict(queries, bank, labels, 4, k=k, t=t)
    torch.testing.assert_close(ours, reference_knn(queries, bank, labels, 4, k, t))


def test_knn_chunking_does_not_change_predictions():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (300,), generator=g)
    queries = F.normalize(torch.randn(101, 16, generator=g), dim=1)
    full = knn_predict(queries, bank, labels, 7, k=15, t=0.1)
    for max_elements in (1, 300, 300 * 7 + 5):  # one query per chunk, ..., ragged last chunk
        torch.testing.assert_close(knn_predict(queries, bank, labels, 7, k=15, t=0.1, max_elements=max_elements), full)


def test_knn_accuracy_is_a_fraction_and_perfect_on_separated_clusters():
    centers = F.normalize(torch.eye(3, 6), dim=1)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat(10)
    bank = F.normalize(centers[labels] + 0.05 * torch.randn(30, 6, generator=g), dim=1)
    q_labels = torch.tensor([2, 0, 1, 1])
    queries = F.normalize(centers[q_labels] + 0.05 * torch.randn(4, 6, generator=g), dim=1)
    assert knn_accuracy(queries, q_labels, bank, labels, 3, k=5, t=0.1) == 1.0
    assert knn_accuracy(queries, (q_labels + 1) % 3, bank, labels, 3, k=5, t=0.1) == 0.0


def test_knn_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected queries \(M, D\) and bank \(N, D\)"):
        knn_predict(torch.zeros(2, 3), torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="bank of 0 rows"):
        knn_predict(torch.zeros(2, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2)


def test_knn_is_lightlys_and_matches_the_float64_reference_on_a_larger_bank():
    from lightly.utils.benchmarking import knn_predict as lightly_knn_predict

    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(400, 16, generator=g), dim=1)
    labels = torch.randint(0, 10, (400,), generator=g)
    queries = F.normalize(torch.randn(60, 16, generator=g), dim=1)
    ours = knn_predict(queries, bank, labels, 10, k=50, t=0.07, max_elements=400 * 7)  # ragged chunks
    torch.testing.assert_close(ours, lightly_knn_predict(queries, bank.t(), labels, 10, knn_k=50, knn_t=0.07)[:, 0])
    torch.testing.assert_close(ours, reference_knn(queries, bank, labels, 10, 50, 0.07))
