"""Durable run-dir files: written whole, and a damaged one is an error naming the file and the fix
(an optional test.json is scored again instead)."""

import json
import logging

import dspy
import pytest

from engine.store import RunStore
from engine.store.files import DamagedFile, atomic_write, read_json, write_json


def _store_with_a_step(root):
    store = RunStore(root, {"strategy": "p"})
    program = dspy.Predict("question -> answer")
    store.commit(0, "", program=program, strategy="", score=50.0, adapters=[])
    store.write_test("00_baseline", {"n": 4, "score": 25.0})
    return store


def test_files_are_written_whole_and_leave_no_temp_file(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    atomic_write(tmp_path / "a.json", json.dumps({"x": 2}))
    assert read_json(tmp_path / "a.json", "fix") == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    store = _store_with_a_step(tmp_path / "run")
    assert not list(store.root.rglob("*.tmp"))


@pytest.mark.parametrize("text, what", [("", "empty"), ('{"strategy": "", "sco', "not valid JSON"),
                                         ("[1, 2]", "not a JSON object")])
def test_a_damaged_step_record_names_the_file_and_the_fix(tmp_path, text, what):
    store = _store_with_a_step(tmp_path / "run")
    (store.root / "00_baseline" / "step.json").write_text(text)
    with pytest.raises(DamagedFile, match=rf"00_baseline/step.json is damaged: {what}.*delete the folder"):
        store.steps()


def test_a_damaged_run_json_is_named_and_a_damaged_test_json_is_scored_again(tmp_path, caplog):
    store = _store_with_a_step(tmp_path / "run")
    (store.root / "00_baseline" / "test.json").write_text('{"n": 4, "sc')  # cut short by a crash
    with caplog.at_level(logging.WARNING):
        (record,) = store.steps()
    assert record.test is None and "test.json is damaged" in caplog.text and "scored again" in caplog.text
    (store.root / "run.json").write_text("")
    with pytest.raises(DamagedFile, match=r"run.json is damaged: empty; restore it"):
        RunStore(store.root, {"strategy": "p"})
    with pytest.raises(DamagedFile, match="run.json is damaged"):
        RunStore(store.root).settings()


def test_a_damaged_step_program_names_the_file_and_the_fix(tmp_path):
    store = _store_with_a_step(tmp_path / "run")
    path = store.root / "00_baseline" / "program.json"
    path.write_text(path.read_text()[: len(path.read_text()) // 2])  # cut short by a crash
    (record,) = store.steps()
    with pytest.raises(DamagedFile, match=r"00_baseline/program.json is damaged \(is not valid JSON.*\); delete the folder .*00_baseline"):
        store.load(record, dspy.Predict("question -> answer"))
