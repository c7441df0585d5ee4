"""GSM8K: the paper's chain-of-thought math program, its data and its metric.

One raw example (a line of the official ``train.jsonl``)::

    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many
     clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\nNatalia sold 48+24 = <<48+24=72>>72
     clips altogether in April and May.\\n#### 72"}

becomes ``dspy.Example(question=..., reasoning="Natalia sold 48/2 = ...", answer="72")`` with input
``question``. The reasoning is kept as written (calculator annotations ``<<...>>`` included).

Metric (the paper's rule, made exact): the LAST number on the FIRST line of the predicted
``answer`` must equal the gold number. Numbers may carry thousands commas (``1,000``), a
leading minus (``-5``, ``-$5``), decimals (``3.50`` equals ``3.5``; ``7.`` is ``7``) and a unit or
currency sign around them (``$18``, ``18 dollars``, ``50%``). A fraction ``a/b`` is read as ONE
number worth a/b (so ``1/2`` equals a gold ``0.5``) rather than as two numbers, of which the paper's
rule would keep ``2``. A hyphen between digits (``10-12``) is a range, not a sign. Numbers
spelled out in words are not numbers. Knows DSPy and the GSM8K file formats; does not download.
"""

from __future__ import annotations

import os
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import dspy

from programs.base import Splits, jsonl_rows

ENV_PATH = "TANDEM_GSM8K_PATH"
_HOW = (f"pass path=<dir> or set {ENV_PATH}=<dir>, where <dir> holds the official train.jsonl and "
        "test.jsonl (github.com/openai/grade-school-math, folder grade_school_math/data/) or a "
        "DatasetDict with 'train' and 'test' written by datasets' save_to_disk")

_NUMBER = re.compile(r"""
    (?:(?<![\w.])(?P<sign>[-\u2212])\$?)?                 # a minus not inside a word or range
    (?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<dec>\.\d+)?|(?P<bare>\.\d+))
    (?:/(?P<den>\d+))?                                    # a fraction a/b is one number
""", re.VERBOSE)


class GSM8KSignature(dspy.Signature):
    """Given the fields `question`, produce the fields `answer`."""  # DSPy's default, as in the paper

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="the final numerical answer")


def Program() -> dspy.Module:  # noqa: N802 - a factory named like the module it builds
    """The paper's GSM8K program: one chain-of-thought predictor ``question -> answer``."""
    return dspy.ChainOfThought(GSM8KSignature)


def numbers(text: str) -> list[Fraction]:
    """The numbers in ``text``, in order, as exact fractions (see the module docstring).

    Example:
        >>> numbers("Pay $1,000.50, not -3 or 1/2.")
        [Fraction(2001, 2), Fraction(-3, 1), Fraction(1, 2)]
    """
    found = []
    for m in _NUMBER.finditer(text):
        value = Fraction((m["int"] or "0").replace(",", "") + (m["dec"] or m["bare"] or ""))
        if m["den"] is not None:
            if int(m["den"]) == 0:
                continue  # "x/0" is no number
            value /= int(m["den"])
        found.append(-value if m["sign"] else value)
    return found


def metric(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    """Whether the last number on the first line of ``prediction.answer`` equals the gold answer.

    Example:
        >>> metric(dspy.Example(answer="1000"), dspy.Prediction(answer="It costs $1,000.\\n"))
        True
    """
    answer = getattr(prediction, "answer", None)
    if answer is None:
        return False
    first_line = str(answer).strip().split("\n", 1)[0]
    predicted, gold = numbers(first_line), numbers(str(example.answer))
    return bool(predicted) and bool(gold) and predicted[-1] == gold[-1]


def load_splits(seed: int = 0, path: str | Path | None = None, train_size: int = 200,
                dev_size: int = 300, test_size: int = 0) -> Splits:
    """Train and dev drawn from GSM8K's train file, test from its test file.

    Args:
        seed: shuffles the train file before train and dev (disjoint) are cut from it.
        path: the data folder (see ``_HOW``); None reads ``$TANDEM_GSM8K_PATH``.
        train_size: examples in train.
        dev_size: examples in dev, after the train ones.
        test_size: the first ``test_size`` examples of the test file, in file order and the same
            for every seed; 0 takes them all.

    Returns:
        ``Splits`` of ``dspy.Example(question, reasoning, answer)`` with input ``question``.

    Raises:
        FileNotFoundError: no path given or nothing usable there (the message says what to give).
        ValueError: a malformed record (file and line named), or sizes the data cannot fill.

    Example:
        >>> splits = load_splits(0, "tests/fixtures/gsm8k", train_size=4, dev_size=4)
        >>> len(splits.train), len(splits.dev), len(splits.test)
        (4, 4, 6)
    """
    if min(train_size, dev_size, test_size) < 0:
        raise ValueError("train_size, dev_size and test_size cannot be negative")
    train_pool, test_pool = _read(_data_dir(path))
    if train_size + dev_size > len(train_pool):
        raise ValueError(f"train_size + dev_size = {train_size + dev_size} but the GSM8K train file "
                         f"has {len(train_pool)} examples")
    if test_size > len(test_pool):
        raise ValueError(f"test_size = {test_size} but the GSM8K test file has {len(test_pool)} examples")
    random.Random(seed).shuffle(train_pool)
    test = test_pool[:test_size] if test_size else test_pool
    return Splits(train_pool[:train_size], train_pool[train_size:train_size + dev_size], test)


def _data_dir(path: str | Path | None) -> Path:
    if path is None:
        path = os.environ.get(ENV_PATH)
        if not path:
            raise FileNotFoundError(f"no GSM8K data given: {_HOW}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"GSM8K data folder {root} does not exist: {_HOW}")
    return root


def _read(root: Path) -> tuple[list[dspy.Example], list[dspy.Example]]:
    if (root / "dataset_dict.json").is_file():
        return _read_saved_dataset(root)
    files = [root / "train.jsonl", root / "test.jsonl"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"GSM8K data folder {root} lacks {missing}: {_HOW}")
    return _read_jsonl(files[0]), _read_jsonl(files[1])


def _read_jsonl(file: Path) -> list[dspy.Example]:
    return [_example(row, where) for where, row in jsonl_rows(file)]


def _read_saved_dataset(root: Path) -> tuple[list[dspy.Example], list[dspy.Example]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{root} was written by HF datasets' save_to_disk; reading it needs "
                          "`pip install datasets` (or give the official train.jsonl/test.jsonl)") from None
    data = datasets.load_from_disk(str(root))
    missing = [s for s in ("train", "test") if s not in data]
    if missing:
        raise ValueError(f"the dataset saved at {root} lacks the splits {missing}")
    return _rows(data["train"], f"{root} [train]"), _rows(data["test"], f"{root} [test]")


def _rows(rows: Iterable[dict], where: str) -> list[dspy.Example]:
    return [_example(row, f"{where} row {i}") for i, row in enumerate(rows)]


def _example(row: Any, where: str) -> dspy.Example:
    """One GSM8K record; ``where`` (file:line) is named in errors."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
            or not isinstance(row.get("answer"), str):
        raise ValueError(f"{where}: a GSM8K record is an object with string 'question' and 'answer'")
    reasoning, sep, gold = row["answer"].rpartition("####")
    gold = gold.strip().replace(",", "")
    if not sep or not re.fullmatch(r"-?\d+(\.\d+)?", gold):
        raise ValueError(f"{where}: the answer must end with '#### <number>', got {row['answer'][-40:]!r}")
    return dspy.Example(question=row["question"].strip(), reasoning=reasoning.strip(),
                        answer=gold).with_inputs("question")
