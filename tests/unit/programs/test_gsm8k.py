"""GSM8K: the first-line last-number metric on tricky answers, and the loader on the fixture files."""

import json
import sys
from pathlib import Path

import dspy
import pytest

from programs import gsm8k
from programs.base import resolve

FIXTURE = Path(__file__).parents[2] / "fixtures" / "gsm8k"


def _ok(predicted: str, gold: str) -> bool:
    return gsm8k.metric(dspy.Example(question="q", answer=gold), dspy.Prediction(answer=predicted))


@pytest.mark.parametrize("predicted, gold", [
    ("72", "72"),
    ("The answer is 1,000.", "1000"),
    ("$18", "18"),
    ("18 dollars", "18"),
    ("-5", "-5"),
    ("It falls to -$5 by night", "-5"),
    ("3.50", "3.5"),
    ("She pays $22.50 / 3 = $7.50 each.", "7.5"),
    ("So the total is 7.", "7"),
    ("48/2 = 24 in May, so 48 + 24 = 72", "72"),  # several numbers: the last counts
    ("half of it: 1/2", "0.5"),                   # a fraction is one number
    ("  \n 42 apples\nbecause 6 * 7 = 42", "42"),  # leading blank lines are not the first line
    ("15,000 people", "15000"),
    ("pages 10-12", "12"),                         # a range, not -12
])
def test_metric_accepts(predicted, gold):
    assert _ok(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [
    ("The answer is\n72", "72"),       # the number only on the second line
    ("seventy-two", "72"),             # no number
    ("", "72"),
    ("72 or maybe 73", "72"),          # the last number of the line is 73
    ("5", "-5"),                       # the sign matters
    ("3.05", "3.5"),
    ("1,0000", "10000"),              # not a thousands separator
    ("1/2", "2"),                      # a fraction is not its denominator
])
def test_metric_rejects(predicted, gold):
    assert not _ok(predicted, gold)


def test_metric_without_answer_is_false():
    assert gsm8k.metric(dspy.Example(question="q", answer="3"), dspy.Prediction(reasoning="3")) is False


def test_program_is_chain_of_thought_question_to_answer():
    program = gsm8k.Program()
    assert isinstance(program, dspy.ChainOfThought)
    signature = program.predict.signature
    assert list(signature.input_fields) == ["question"]
    assert list(signature.output_fields) == ["reasoning", "answer"]


def test_loader_reads_the_official_format():
    splits = gsm8k.load_splits(0, FIXTURE, train_size=5, dev_size=7, test_size=0)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (5, 7, 6)
    by_question = {ex.question: ex for ex in splits.train + splits.dev}
    school = by_question["A school buys 250 chairs at $4 each. How much does the school pay?"]
    assert school.answer == "1000" and school.reasoning == "The school pays 250 * 4 = <<250*4=1000>>1000 dollars."
    answers = {ex.answer for ex in splits.train + splits.dev}
    assert {"-5", "3.5", "15000", "2.25"} <= answers
    assert all(set(ex.inputs().keys()) == {"question"} for ex in splits.train + splits.dev + splits.test)
    assert [ex.answer for ex in splits.test] == ["30", "180", "6000", "4", "-8", "7.5"]  # file order


def test_loader_seed_determinism_and_disjoint_splits():
    a = gsm8k.load_splits(1, FIXTURE, train_size=6, dev_size=6, test_size=2)
    b = gsm8k.load_splits(1, str(FIXTURE), train_size=6, dev_size=6, test_size=2)
    c = gsm8k.load_splits(2, FIXTURE, train_size=6, dev_size=6, test_size=2)
    questions = lambda xs: [x.question for x in xs]  # noqa: E731
    assert questions(a.train) == questions(b.train) and questions(a.dev) == questions(b.dev)
    assert questions(a.train) != questions(c.train)
    assert not set(questions(a.train)) & set(questions(a.dev))
    assert len(set(questions(a.train) + questions(a.dev))) == 12
    assert questions(a.test) == questions(c.test)  # the test set does not depend on the seed
    assert len(a.test) == 2


def test_loader_reads_the_env_var(monkeypatch):
    monkeypatch.setenv(gsm8k.ENV_PATH, str(FIXTURE))
    assert len(gsm8k.load_splits(0, train_size=2, dev_size=3).dev) == 3


def test_loader_without_path_says_how_to_give_data(monkeypatch):
    monkeypatch.delenv(gsm8k.ENV_PATH, raising=False)
    with pytest.raises(FileNotFoundError, match="TANDEM_GSM8K_PATH.*train.jsonl"):
        gsm8k.load_splits(0)


def test_loader_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gsm8k.load_splits(0, tmp_path / "nope")
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        gsm8k.load_splits(0, tmp_path)


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"question": "q", "answer": "no final line"}), "#### <number>"),
    (json.dumps({"question": "q"}), "'question' and 'answer'"),
])
def test_loader_names_file_and_line_of_a_malformed_record(tmp_path, bad, message):
    lines = (FIXTURE / "train.jsonl").read_text().splitlines()
    lines.insert(3, bad)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.jsonl").write_text((FIXTURE / "test.jsonl").read_text())
    with pytest.raises(ValueError, match=rf"train\.jsonl:4: .*{message}"):
        gsm8k.load_splits(0, tmp_path, train_size=1, dev_size=1)


def test_loader_refuses_sizes_the_data_cannot_fill():
    with pytest.raises(ValueError, match="has 12 examples"):
        gsm8k.load_splits(0, FIXTURE, train_size=10, dev_size=3)
    with pytest.raises(ValueError, match="has 6 examples"):
        gsm8k.load_splits(0, FIXTURE, train_size=1, dev_size=1, test_size=7)


def test_saved_dataset_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without the package
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ImportError, match="pip install datasets"):
        gsm8k.load_splits(0, tmp_path)


def test_saved_dataset_round_trip(tmp_path):
    import datasets

    rows = lambda name: [json.loads(line) for line in (FIXTURE / name).read_text().splitlines()]  # noqa: E731
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("train.jsonl")),
                          "test": datasets.Dataset.from_list(rows("test.jsonl"))}).save_to_disk(str(tmp_path))
    from_disk = gsm8k.load_splits(3, tmp_path, train_size=4, dev_size=4)
    from_jsonl = gsm8k.load_splits(3, FIXTURE, train_size=4, dev_size=4)
    assert [x.toDict() for x in from_disk.dev] == [x.toDict() for x in from_jsonl.dev]


def test_resolves_as_a_program_module():
    spec = resolve("gsm8k")
    assert (spec.factory, spec.loader, spec.metric) == (gsm8k.Program, gsm8k.load_splits, gsm8k.metric)
