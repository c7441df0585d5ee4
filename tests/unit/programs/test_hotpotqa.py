"""HotPotQA: the normalized exact-match metric, the loader, and the two-hop program end to end."""

import inspect
import json
from pathlib import Path

import dspy
import pytest
from dspy.utils import DummyLM

from programs import hotpotqa
from programs.retrieval import BM25Retriever

FIXTURES = Path(__file__).parents[2] / "fixtures" / "hotpotqa"
CORPUS, QUESTIONS = FIXTURES / "corpus.jsonl", FIXTURES / "questions.json"
QUESTION = "In which town was the designer of Marlow Bridge born?"


@pytest.fixture(scope="module")
def retriever():
    return BM25Retriever(CORPUS)


@pytest.mark.parametrize("predicted, gold, ok", [
    ("Harrowgate Mills", "Harrowgate Mills", True),
    ("  harrowgate   mills. ", "Harrowgate Mills", True),
    ("The Silent Orchard", "Silent Orchard", True),   # articles drop
    ("an apple", "Apple", True),
    ("Edwin Hallam's", "Edwin Hallams", True),        # punctuation drops
    ("Harrowgate", "Harrowgate Mills", False),        # no partial credit
    ("Harrowgate Mills, a market town", "Harrowgate Mills", False),
    ("no", "yes", False),
    ("", "yes", False),
    ("1889", ["1889", "eighteen eighty-nine"], True),  # any of several gold answers
])
def test_metric(predicted, gold, ok):
    assert hotpotqa.metric(dspy.Example(question="q", answer=gold), dspy.Prediction(answer=predicted)) is ok


def test_metric_without_answer_is_false():
    assert hotpotqa.metric(dspy.Example(question="q", answer="x"), dspy.Prediction(reasoning="x")) is False


def test_normalize_answer():
    assert hotpotqa.normalize_answer("  The  Eiffel-Tower! A tower, an icon ") == "eiffeltower tower icon"
    assert hotpotqa.normalize_answer("Theatre") == "theatre"  # "the" inside a word stays


def test_loader_official_json(monkeypatch):
    splits = hotpotqa.load_splits(0, QUESTIONS, train_size=6, dev_size=4)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (6, 4, 2)
    every = splits.train + splits.dev + splits.test
    raw = {row["question"]: row["answer"] for row in json.loads(QUESTIONS.read_text())}
    assert {ex.question: ex.answer for ex in every} == raw
    assert all(set(ex.inputs().keys()) == {"question"} and set(ex.keys()) == {"question", "answer"} for ex in every)
    monkeypatch.setenv(hotpotqa.ENV_PATH, str(QUESTIONS))
    again = hotpotqa.load_splits(0, train_size=6, dev_size=4)
    assert [ex.question for ex in again.dev] == [ex.question for ex in splits.dev]
    other = hotpotqa.load_splits(5, QUESTIONS, train_size=6, dev_size=4, test_size=1)
    assert [ex.question for ex in other.train] != [ex.question for ex in splits.train] and len(other.test) == 1


def test_loader_jsonl_and_errors(tmp_path, monkeypatch):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(5)]
    good = tmp_path / "q.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = hotpotqa.load_splits(0, good, train_size=2, dev_size=2)
    assert sorted(ex.question for ex in splits.train + splits.dev + splits.test) == [r["question"] for r in rows]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'question' and 'answer'"):
        hotpotqa.load_splits(0, bad, train_size=1, dev_size=0)
    with pytest.raises(ValueError, match="ask for 6 questions .* has 5"):
        hotpotqa.load_splits(0, good, train_size=3, dev_size=3)
    monkeypatch.delenv(hotpotqa.ENV_PATH, raising=False)
    with pytest.raises(FileNotFoundError, match="TANDEM_HOTPOTQA_PATH"):
        hotpotqa.load_splits(0)


def test_program_predictors_and_forward_signature(retriever):
    program = hotpotqa.Program(retriever)
    names = [name for name, _ in program.named_predictors()]
    assert names == ["generate_query_1.predict", "generate_query_2.predict", "generate_answer.predict"]
    assert list(inspect.signature(program.forward).parameters) == ["question"]
    last = program.generate_answer.predict.signature
    assert list(last.input_fields) == ["context", "question"] and "answer" in last.output_fields
    assert program.deepcopy().retrieve is retriever  # copies share the index


def test_program_runs_two_hops_end_to_end(retriever):
    program = hotpotqa.Program(retriever, passages_per_hop=3)
    lm = DummyLM([{"reasoning": "Find the designer.", "search_query": "Marlow Bridge designer"},
                  {"reasoning": "Ada Fenwick designed it.", "search_query": "Ada Fenwick born town"},
                  {"reasoning": "She was born in Harrowgate Mills.", "answer": "Harrowgate Mills"}])
    with dspy.context(lm=lm, trace=[]):
        prediction = program(question=QUESTION)
        trace = list(dspy.settings.trace)
    assert [predictor for predictor, _, _ in trace] == [p for _, p in program.named_predictors()]
    (_, hop1, _), (_, hop2, _), (_, final, _) = trace
    hop1_passages, hop2_passages = retriever("Marlow Bridge designer", 3), retriever("Ada Fenwick born town", 3)
    assert hop1["context"] == [] and hop2["context"] == hop1_passages
    expected = list(dict.fromkeys(hop1_passages + hop2_passages))
    assert len(expected) < 6  # the hops overlap ("Marlow Bridge" twice) and the context keeps it once
    assert final == {"context": expected, "question": QUESTION}
    assert any(p.startswith("Marlow Bridge | ") for p in final["context"])
    assert any(p.startswith("Ada Fenwick | ") for p in final["context"])
    assert prediction.answer == "Harrowgate Mills" and prediction.context == expected
    assert hotpotqa.metric(dspy.Example(question=QUESTION, answer="Harrowgate Mills"), prediction)


def test_program_retriever_from_spec_or_env(monkeypatch):
    monkeypatch.delenv(hotpotqa.ENV_CORPUS, raising=False)
    with pytest.raises(ValueError, match="TANDEM_HOTPOTQA_CORPUS"):
        hotpotqa.Program()
    spec = hotpotqa.Program(f"bm25:{CORPUS}", passages_per_hop=2)
    assert isinstance(spec.retrieve, BM25Retriever) and spec.passages_per_hop == 2
    assert hotpotqa.Program(f"bm25:{CORPUS}").retrieve is spec.retrieve  # built once per spec
    monkeypatch.setenv(hotpotqa.ENV_CORPUS, str(CORPUS))  # a bare path means BM25
    assert hotpotqa.Program().retrieve.corpus_path == CORPUS
    with pytest.raises(ValueError, match="spec string or a callable"):
        hotpotqa.Program(42)
    with pytest.raises(ValueError, match="passages_per_hop"):
        hotpotqa.Program(f"bm25:{CORPUS}", passages_per_hop=0)


def test_resolves_as_a_program_module():
    from programs.base import resolve

    spec = resolve("hotpotqa")
    assert (spec.factory, spec.loader, spec.metric) == (hotpotqa.Program, hotpotqa.load_splits, hotpotqa.metric)


def test_program_ships_with_cloudpickle(retriever):
    cloudpickle = pytest.importorskip("cloudpickle")  # what Ray uses to send a program to actors
    shipped = cloudpickle.loads(cloudpickle.dumps(hotpotqa.Program(retriever)))
    assert [name for name, _ in shipped.named_predictors()][-1] == "generate_answer.predict"
    assert shipped.retrieve("Where was Ada Fenwick born?", 2) == retriever("Where was Ada Fenwick born?", 2)
