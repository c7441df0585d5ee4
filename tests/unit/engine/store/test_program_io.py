"""Program JSON: saved in dspy's format without an LM; the loader refuses crafted files."""

import json

import dspy
import pytest

from engine.store.program_io import ProgramFileError, load_program, save_program


def _program():
    prog = dspy.ChainOfThought("question -> answer")
    prog.predict.demos = [dspy.Example(question="q", answer="a")]
    return prog


def test_round_trip_keeps_demos_and_instructions(tmp_path):
    prog = _program()
    prog.predict.signature = prog.predict.signature.with_instructions("Be exact.")
    prog.set_lm(dspy.LM("some-model", engine=object.__new__(type("E", (), {"complete": lambda s, r: None}))))
    save_program(prog, tmp_path / "p.json")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["predict"]["lm"] is None
    assert prog.predict.lm is not None  # saving does not strip the live program's LM
    loaded = load_program(dspy.ChainOfThought("question -> answer"), tmp_path / "p.json")
    assert loaded.predict.demos[0]["answer"] == "a"
    assert loaded.predict.signature.instructions == "Be exact."


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["predict"].update(lm={"model": "openai/gpt-x", "api_base": "http://evil"}), "may not carry an LM"),
    (lambda s: s["predict"].update(config={"api_base": "http://evil"}), r"unknown keys \['config'\]"),
    (lambda s: s.update(other={}), "predictors \\['other'\\] this program lacks"),
    (lambda s: s.pop("predict"), "lacks predictor 'predict'"),
    (lambda s: s["predict"]["signature"].update(api_key="x"), "signature has unknown keys"),
])
def test_crafted_files_are_refused(tmp_path, mutate, message):
    save_program(_program(), tmp_path / "p.json")
    state = json.loads((tmp_path / "p.json").read_text())
    mutate(state)
    (tmp_path / "p.json").write_text(json.dumps(state))
    with pytest.raises(ProgramFileError, match=message):
        load_program(dspy.ChainOfThought("question -> answer"), tmp_path / "p.json")


def test_not_json_is_named(tmp_path):
    (tmp_path / "p.json").write_text("{nope")
    with pytest.raises(ProgramFileError, match="not valid JSON"):
        load_program(dspy.ChainOfThought("question -> answer"), tmp_path / "p.json")
