"""The final run's per-image test predictions (test_predictions.csv): written and read back, or refused."""

from __future__ import annotations

import numpy as np
import pytest

from search.evaluation.predictions import Predictions, predictions_csv, read_predictions


def test_predictions_round_trip_through_the_csv_with_awkward_class_names():
    classes = ["a, with comma", 'quote "q"', "plain"]
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=7)
    original = Predictions([f"x/{i}.png" for i in range(7)], rng.integers(0, 3, 7), probabilities, classes)
    back = read_predictions(predictions_csv(original), "test")
    assert back.keys == original.keys and back.classes == classes
    assert np.array_equal(back.labels, original.labels)
    assert np.allclose(back.probabilities, probabilities, rtol=1e-7)
    assert np.array_equal(back.predicted, original.predicted)


def test_a_file_that_is_not_a_predictions_csv_is_refused_by_name():
    with pytest.raises(ValueError, match=r"not a test_predictions\.csv"):
        read_predictions("a,b\n1,2\n", "run R's file")
