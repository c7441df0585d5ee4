"""Iris: the species metric's normalization, and the loader's 50/50/50 seeded split."""

import dspy
import pytest

from programs import iris
from programs.base import resolve


@pytest.mark.parametrize("predicted, gold, ok", [
    ("setosa", "setosa", True),
    ("Iris-setosa", "setosa", True),
    ("Setosa.", "setosa", True),
    ("iris virginica", "virginica", True),
    ("versicolor", "virginica", False),
    ("", "setosa", False),
    ("setosa or versicolor", "versicolor", False),  # the first species word is the answer
])
def test_metric(predicted, gold, ok):
    assert iris.metric(dspy.Example(answer=gold), dspy.Prediction(answer=predicted)) is ok


def test_metric_without_answer_is_false():
    assert iris.metric(dspy.Example(answer="setosa"), dspy.Prediction(reasoning="setosa")) is False


def test_loader_splits_by_seed():
    pytest.importorskip("sklearn")
    a, b, c = iris.load_splits(0), iris.load_splits(0), iris.load_splits(1)
    assert (len(a.train), len(a.dev), len(a.test)) == (50, 50, 50)
    assert [x.toDict() for x in a.dev] == [x.toDict() for x in b.dev]
    assert [x.toDict() for x in a.dev] != [x.toDict() for x in c.dev]
    assert {x.answer for x in a.train + a.dev + a.test} == set(iris.LABELS)
    assert resolve("iris").loader is iris.load_splits
