import numpy as np

from service.topk import predictions, softmax, topk_indices


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([[1000.0, 0.0, -1000.0]]))
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-12 and p[0, 0] > 0.999


def test_temperature_flattens():
    logits = np.array([[2.0, 1.0, 0.0]])
    assert softmax(logits, 2.0)[0, 0] < softmax(logits, 1.0)[0, 0]


def test_ties_break_to_lower_index():
    assert topk_indices(np.array([[0.2, 0.5, 0.5, 0.1]]), 3).tolist() == [[1, 2, 0]]


def test_predictions_have_labels_and_sorted_scores():
    labels = ["a", "b", "c", "d", "e", "f"]
    (out,) = predictions(np.array([[0.0, 3.0, 1.0, 2.0, -1.0, 0.5]]), labels, temperature=1.0, k=5)
    assert out[0].label == "b" and out[0].index == 1
    scores = [p.score for p in out]
    assert [p.label for p in out] == ["b", "d", "c", "f", "a"]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 0.05


def test_k_larger_than_classes():
    out = predictions(np.array([[1.0, 2.0]]), ["x", "y"], temperature=1.0, k=5)
    assert len(out[0]) == 2
