"""Iris: the paper's single-module chain-of-thought classifier, its data and metric.

One raw example (from scikit-learn's copy of Fisher's data)::

    petal_length=1.4, petal_width=0.2, sepal_length=5.1, sepal_width=3.5 -> answer="setosa"

Data: the 150 flowers of ``sklearn.datasets.load_iris``, shuffled by ``seed`` and split into
train / dev / test of 50 each. Metric: exact match after lower-casing and stripping punctuation,
with the species name alone (``"Iris-setosa"`` and ``"setosa."`` count as ``setosa``).
The answer is a ``Literal`` of the three species: DSPy's prompt names them, and under Tandem's
``constrained`` adapter the model can only answer one of them (with ``chat`` an answer that is
not one of them fails to parse). Knows DSPy only.
"""

from __future__ import annotations

import random
import re
from typing import Literal

import dspy

from programs.base import Splits

LABELS = ("setosa", "versicolor", "virginica")


class IrisSignature(dspy.Signature):
    """Given the petal and sepal dimensions in cm, predict the iris species."""

    petal_length: float = dspy.InputField()
    petal_width: float = dspy.InputField()
    sepal_length: float = dspy.InputField()
    sepal_width: float = dspy.InputField()
    answer: Literal["setosa", "versicolor", "virginica"] = dspy.OutputField()


def Program() -> dspy.Module:  # noqa: N802 - a factory named like the module it builds
    """The paper's Iris program: one chain-of-thought predictor."""
    return dspy.ChainOfThought(IrisSignature)


def load_splits(seed: int = 0) -> Splits:
    """The 150 flowers, shuffled by ``seed``, as train/dev/test of 50 each."""
    from sklearn.datasets import load_iris

    data = load_iris()
    examples = [
        dspy.Example(sepal_length=float(x[0]), sepal_width=float(x[1]), petal_length=float(x[2]),
                     petal_width=float(x[3]), answer=LABELS[int(y)]).with_inputs(
            "petal_length", "petal_width", "sepal_length", "sepal_width")
        for x, y in zip(data.data, data.target)
    ]
    random.Random(seed).shuffle(examples)
    return Splits(examples[:50], examples[50:100], examples[100:])


def normalize(text: str) -> str:
    """Lower-case, drop an ``iris`` prefix and punctuation."""
    text = re.sub(r"[^a-z ]", " ", str(text).lower()).split()
    words = [w for w in text if w != "iris"]
    return words[0] if words else ""


def metric(example: dspy.Example, prediction, trace=None) -> bool:
    """Exact match of the normalized species name."""
    answer = getattr(prediction, "answer", None)
    return answer is not None and normalize(answer) == example.answer
