"""Reading a run dir for serving: the winner, one step, and the errors for unfinished or moved runs."""

import json

import pytest

from serve.winner import RunDirError, load_winner

BASE = "smollm2-135m-instruct"
ADAPTER = f"{BASE}:ft-02-abcd1234"


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "run"
    (root / "adapters" / ADAPTER.replace(":", "_")).mkdir(parents=True)
    (root / "adapters" / ADAPTER.replace(":", "_") / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (root / "run.json").write_text(json.dumps({"max_tokens": 150, "max_model_len": 1024}))
    (root / "program.json").write_text("{}")
    (root / "best.json").write_text(json.dumps({
        "program": "iris", "base_model": BASE, "strategy": "p", "score": 50.0, "models": {"predict": BASE},
        "adapters": {}}))
    (root / "02_w").mkdir()
    (root / "02_w" / "program.json").write_text('{"x": 1}')
    (root / "02_w" / "step.json").write_text(json.dumps({
        "strategy": "p -> w", "score": 50.0, "models": {"predict": ADAPTER},
        "adapters": [{"name": ADAPTER, "path": "/elsewhere/moved"}]}))
    return root


def test_winner_and_step(run_dir):
    best = load_winner(run_dir)
    assert (best.strategy, best.model, best.adapters, best.max_tokens) == ("p", BASE, {}, 150)
    step = load_winner(run_dir, "02_w")
    assert step.strategy == "p -> w" and step.model == ADAPTER
    # the recorded adapter path is gone (run dir moved): found again under RUN_DIR/adapters
    assert step.adapters == {ADAPTER: str(run_dir / "adapters" / ADAPTER.replace(":", "_"))}
    assert step.max_lora_rank == 16 and step.version != best.version


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
