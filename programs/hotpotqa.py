"""HotPotQA: the paper's multi-hop retrieval program, its data and its metric.

One raw example (an item of the official ``hotpot_train_v1.1.json``, a JSON list)::

    {"_id": "5a7a06935542990198eaf050", "question": "Which magazine was started first Arthur's
     Magazine or First for Women?", "answer": "Arthur's Magazine", "type": "comparison",
     "level": "medium", "supporting_facts": [["Arthur's Magazine", 0], ...],
     "context": [["Arthur's Magazine", ["Arthur's Magazine (1844-1846) was ...", ...]], ...]}

becomes ``dspy.Example(question=..., answer="Arthur's Magazine")`` with input ``question``; JSONL
with at least ``question`` and ``answer`` per line works too. The program (the paper's appendix)
writes a search query twice, each time retrieving ``passages_per_hop`` passages and adding the
new ones to the context, then answers from the context. Metric: exact match after SQuAD-style
normalization. Knows DSPy and ``programs.retrieval``; does not build corpora or download data.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import string
from pathlib import Path
from typing import Any

import dspy

from programs.base import Splits, jsonl_rows
from programs.retrieval import Retriever, make_retriever

ENV_CORPUS = "TANDEM_HOTPOTQA_CORPUS"
ENV_PATH = "TANDEM_HOTPOTQA_PATH"


class MultiHop(dspy.Module):
    """Two query-writing hops over a retriever, then an answer from the gathered passages."""

    def __init__(self, retriever: Retriever, passages_per_hop: int = 3) -> None:
        super().__init__()
        self.retrieve = retriever
        self.passages_per_hop = passages_per_hop
        self.generate_query_1 = dspy.ChainOfThought("context, question -> search_query")
        self.generate_query_2 = dspy.ChainOfThought("context, question -> search_query")
        self.generate_answer = dspy.ChainOfThought("context, question -> answer")  # last: the outputs

    def forward(self, question: str) -> dspy.Prediction:
        """The answer to ``question``, with the reasoning and the retrieved ``context``."""
        context: list[str] = []
        for hop in (self.generate_query_1, self.generate_query_2):
            query = hop(context=context, question=question).search_query
            context = list(dict.fromkeys(context + self.retrieve(query, self.passages_per_hop)))
        answer = self.generate_answer(context=context, question=question)
        return dspy.Prediction(context=context, reasoning=answer.reasoning, answer=answer.answer)


def Program(retriever: str | Retriever | None = None, passages_per_hop: int = 3) -> dspy.Module:  # noqa: N802
    """The paper's multi-hop program over ``retriever``.

    Args:
        retriever: a ``programs.retrieval.make_retriever`` spec (``"bm25:/path/corpus.jsonl"`` or
            a ColBERTv2 URL) or a retriever object. None reads ``$TANDEM_HOTPOTQA_CORPUS``: a spec,
            or a bare path taken as a BM25 corpus. A spec's retriever is built once per process.
        passages_per_hop: passages retrieved by each of the two hops.

    Raises:
        ValueError: no retriever given nor set in the environment, or a bad spec.

    Example:
        >>> program = Program("bm25:tests/fixtures/hotpotqa/corpus.jsonl")
        >>> [name for name, _ in program.named_predictors()][-1]
        'generate_answer.predict'
    """
    if passages_per_hop < 1:
        raise ValueError(f"passages_per_hop must be at least 1, got {passages_per_hop}")
    if retriever is None:
        retriever = os.environ.get(ENV_CORPUS, "").strip()
        if not retriever:
            raise ValueError(f"the HotPotQA program needs a retriever: Program(retriever='bm25:/path/corpus.jsonl' "
                             f"or a ColBERTv2 URL), or set {ENV_CORPUS} to one of those (or to a corpus path)")
        if not retriever.startswith(("bm25:", "http://", "https://")):
            retriever = f"bm25:{retriever}"
    if isinstance(retriever, str):
        retriever = _retriever(retriever)
    if not callable(retriever):
        raise ValueError(f"retriever must be a spec string or a callable (query, k) -> passages, got {retriever!r}")
    return MultiHop(retriever, passages_per_hop)


@functools.lru_cache(maxsize=8)
def _retriever(spec: str) -> Retriever:
    """One retriever per spec and process: fresh programs do not rebuild a BM25 index."""
    return make_retriever(spec)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower-case, drop punctuation and the articles a/an/the, one space.

    Example:
        >>> normalize_answer("  The  Eiffel-Tower! ")
        'eiffeltower'
    """
    text = "".join(c for c in str(text).lower() if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def metric(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    """Exact match of the normalized answer with the gold one (or any of a list of gold answers)."""
    answer = getattr(prediction, "answer", None)
    if answer is None:
        return False
    golds = example.answer if isinstance(example.answer, (list, tuple)) else [example.answer]
    return normalize_answer(answer) in {normalize_answer(gold) for gold in golds}


def load_splits(seed: int = 0, path: str | Path | None = None, train_size: int = 200,
                dev_size: int = 300, test_size: int = 0) -> Splits:
    """Questions from one HotPotQA file, shuffled by ``seed`` and cut into train / dev / test.

    Args:
        seed: the shuffle.
        path: the official JSON list or a JSONL file; None reads ``$TANDEM_HOTPOTQA_PATH``.
        train_size: questions in train.
        dev_size: questions in dev, after the train ones.
        test_size: questions in test, after the dev ones; 0 takes all the rest.

    Returns:
        ``Splits`` of ``dspy.Example(question, answer)`` with input ``question``.

    Raises:
        FileNotFoundError: no path given, or no such file.
        ValueError: a malformed record (file and line or item named), or sizes the file cannot fill.

    Example:
        >>> splits = load_splits(0, "tests/fixtures/hotpotqa/questions.json", train_size=6, dev_size=4)
        >>> len(splits.train), len(splits.dev), len(splits.test)
        (6, 4, 2)
    """
    if min(train_size, dev_size, test_size) < 0:
        raise ValueError("train_size, dev_size and test_size cannot be negative")
    file = _data_file(path)
    examples = _read(file)
    wanted = train_size + dev_size + test_size
    if wanted > len(examples):
        raise ValueError(f"the sizes ask for {wanted} questions but {file} has {len(examples)}")
    random.Random(seed).shuffle(examples)
    end = train_size + dev_size
    test = examples[end:] if test_size == 0 else examples[end:end + test_size]
    return Splits(examples[:train_size], examples[train_size:end], test)


def _data_file(path: str | Path | None) -> Path:
    how = (f"pass path=<file> or set {ENV_PATH}=<file>: the official HotPotQA JSON (e.g. "
           "hotpot_train_v1.1.json) or JSONL with 'question' and 'answer' per line")
    if path is None:
        path = os.environ.get(ENV_PATH)
        if not path:
            raise FileNotFoundError(f"no HotPotQA data given: {how}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"HotPotQA file {file} does not exist: {how}")
    return file


def _read(file: Path) -> list[dspy.Example]:
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return [_example(row, f"{file} item {i}") for i, row in enumerate(rows)]
    return [_example(row, where) for where, row in jsonl_rows(file)]


def _example(row: Any, where: str) -> dspy.Example:
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
            or not isinstance(row.get("answer"), str):
        raise ValueError(f"{where}: a HotPotQA record is an object with string 'question' and 'answer'")
    return dspy.Example(question=row["question"].strip(), answer=row["answer"].strip()).with_inputs("question")
