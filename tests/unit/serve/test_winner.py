"""Reading a run dir for serving: the winner, one step, and the errors for unfinished or moved runs."""

import json

import pytest

from actors.dspy_side.finetune import adapter_dir_name
from serve.winner import RunDirError, load_winner

BASE = "org/SmolLM2-135M"  # a hub id: the adapter folder must not nest under adapters/org/
ADAPTER = f"{BASE}:ft-02-abcd1234"
FOLDER = adapter_dir_name(ADAPTER)


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "run"
    (root / "adapters" / FOLDER).mkdir(parents=True)
    (root / "adapters" / FOLDER / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (root / "run.json").write_text(json.dumps({"max_tokens": 150, "max_model_len": 1024}))
    (root / "program.json").write_text("{}")
    (root / "best.json").write_text(json.dumps({
        "program": "iris", "base_model": BASE, "strategy": "p", "score": 50.0, "models": {"predict": BASE},
        "adapters": {}}))
    (root / "02_w").mkdir()
    (root / "02_w" / "program.json").write_text('{"x": 1}')
    (root / "02_w" / "step.json").write_text(json.dumps({
        "strategy": "p -> w", "score": 50.0, "models": {"predict": ADAPTER},
        "adapters": [{"name": ADAPTER, "path": f"/elsewhere/run/adapters/{FOLDER}"}]}))
    return root


def test_winner_and_step(run_dir):
    best = load_winner(run_dir)
    assert (best.strategy, best.model, best.adapters, best.max_tokens) == ("p", BASE, {}, 150)
    step = load_winner(run_dir, "02_w")
    assert step.strategy == "p -> w" and step.model == ADAPTER
    # an older run dir recorded absolute paths; this one was moved since: found again under RUN_DIR/adapters
    assert step.adapters == {ADAPTER: str(run_dir / "adapters" / FOLDER)}
    assert step.max_lora_rank == 16 and step.version != best.version


def test_relative_adapter_paths_follow_a_moved_run_dir(run_dir, tmp_path):
    record = json.loads((run_dir / "02_w" / "step.json").read_text())
    record["adapters"] = [{"name": ADAPTER, "path": f"adapters/{FOLDER}"}]
    (run_dir / "02_w" / "step.json").write_text(json.dumps(record))
    moved = run_dir.rename(tmp_path / "elsewhere")
    assert load_winner(moved, "02_w").adapters == {ADAPTER: str(moved / "adapters" / FOLDER)}


def test_adapter_folder_names_are_flat_safe_and_distinct():
    ids = ["org/name:ft-02-aa", "/abs/ckpt/m:ft-02-aa", "ckpt/m:ft-02-aa", "ckpt-m:ft-02-aa", "a b?*<>|:ft"]
    names = [adapter_dir_name(i) for i in ids]
    assert len(set(names)) == len(ids)  # 'ckpt/m' and 'ckpt-m' slug alike; the hash keeps them apart
    assert all("/" not in n and n == n.strip("-.") and all(c.isalnum() or c == "-" for c in n) for n in names)
    assert adapter_dir_name("x" * 500 + ":ft") != adapter_dir_name("y" * 500 + ":ft")
    assert max(len(adapter_dir_name(i * 300)) for i in ids) <= 100


def test_unfinished_or_missing_runs_are_named(run_dir, tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        load_winner(tmp_path / "nope")
    with pytest.raises(RunDirError, match="no completed step '03_p'; completed: \\['02_w'\\]"):
        load_winner(run_dir, "03_p")
    (run_dir / "best.json").unlink()
    with pytest.raises(RunDirError, match="has no best.json: not a finished run"):
        load_winner(run_dir)


def test_missing_adapter_is_named(run_dir):
    import shutil

    shutil.rmtree(run_dir / "adapters")
    with pytest.raises(RunDirError, match=f"uses adapter '{ADAPTER}'"):
        load_winner(run_dir, "02_w")


def test_interface_takes_the_programs_own_inputs():
    import dspy

    from serve.winner import interface

    class TwoHop(dspy.Module):
        def __init__(self):
            super().__init__()
            self.generate_query = dspy.ChainOfThought("context, question -> search_query")
            self.generate_answer = dspy.ChainOfThought("context, question -> answer: int")

        def forward(self, question: str):
            return self.generate_answer(context="", question=question)

    inputs, outputs = interface(TwoHop())
    assert [f.name for f in inputs] == ["question"]
    assert [(f.name, f.annotation) for f in outputs] == [("reasoning", str), ("answer", int)]
    inputs, _ = interface(dspy.ChainOfThought("a: int, b -> c"))  # forward(**kwargs): the predictor's fields
    assert [(f.name, f.annotation) for f in inputs] == [("a", int), ("b", str)]


def test_adapters_outside_the_run_dir_are_refused(run_dir, tmp_path):
    outside = tmp_path / "outside" / FOLDER
    outside.mkdir(parents=True)
    (outside / "adapter_config.json").write_text(json.dumps({"r": 8}))
    record = json.loads((run_dir / "02_w" / "step.json").read_text())
    record["adapters"] = [{"name": ADAPTER, "path": f"../outside/{FOLDER}"}]
    (run_dir / "02_w" / "step.json").write_text(json.dumps(record))
    with pytest.raises(RunDirError, match="outside the run dir"):
        load_winner(run_dir, "02_w")


def test_only_built_in_or_allowed_program_modules_are_served():
    from serve.winner import check_allowed

    check_allowed("iris")
    check_allowed("programs.hotpotqa")
    check_allowed("acme.progs.qa:Make", ["acme"])
    with pytest.raises(RunDirError, match="allow it with --allow-program os"):
        check_allowed("os")
    with pytest.raises(RunDirError, match="--allow-program acmex.progs"):
        check_allowed("acmex.progs", ["acme"])  # a prefix of the name is not its package
