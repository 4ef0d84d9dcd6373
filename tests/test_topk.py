import numpy as np

from service.topk import predictions, score_batch, softmax, top_of, topk_indices


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


def test_a_batch_scored_at_once_answers_each_row_as_alone():
    """The service scores whole batches (softmax and ranking once per batch); each image's answer must be exactly what
    scoring it alone gives, within the ranks kept and beyond them (ranked again from the row), ties included."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(32, 10)).astype(np.float32)
    logits[3, [2, 7]] = logits[3, 5]  # a three-way tie
    labels = [f"label{i}" for i in range(10)]
    rows = score_batch(logits, temperature=1.3, keep=5)
    for i, row in enumerate(rows):
        assert row.ranked == topk_indices(softmax(logits[i : i + 1], 1.3), 5)[0].tolist()
        assert np.array_equal(row.probabilities32, softmax(logits[i : i + 1], 1.3)[0].astype(np.float32))
        for k in (1, 5, 6, 10):
            assert top_of(row, labels, k) == predictions(logits[i : i + 1], labels, temperature=1.3, k=k)[0]
    tied = [i for i in (p.index for p in top_of(rows[3], labels, 10)) if i in (2, 5, 7)]
    assert tied == [2, 5, 7]  # equal scores keep label order
