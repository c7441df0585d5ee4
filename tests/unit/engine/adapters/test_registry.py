"""The run's adapter setting: names, the adapter and stop strings each gives, the checks, and that a
finished run dir tells the server which adapter to use."""

import dspy
import pytest

from engine.adapters.registry import ADAPTERS, make_adapter, stop_for
from engine.cli import build_parser, _run_config
from engine.config import RunConfig


def test_each_name_gives_its_adapter_and_stop_strings():
    from engine.adapters.constrained import ConstrainedChatAdapter

    chat, json_, constrained = (make_adapter(n) for n in ADAPTERS)
    assert type(chat) is dspy.ChatAdapter and not chat.use_json_adapter_fallback
    assert isinstance(json_, dspy.JSONAdapter) and isinstance(constrained, ConstrainedChatAdapter)
    assert stop_for("chat") == ("[[ ## completed ## ]]",) and stop_for("json") == stop_for("constrained") == ()
    with pytest.raises(ValueError, match="adapter must be one of"):
        make_adapter("xml")


def test_the_setting_is_checked_is_a_flag_and_is_part_of_the_fingerprint():
    with pytest.raises(ValueError, match="adapter must be one of \\['chat', 'json', 'constrained'\\], got 'xml'"):
        RunConfig(adapter="xml")
    assert _run_config(build_parser().parse_args(["run", "--adapter", "constrained"])).adapter == "constrained"
    assert RunConfig().adapter == "constrained" and RunConfig().fingerprint()["adapter"] == "constrained"
    with pytest.raises(ValueError, match="adapter 'json' cannot write the weight step's training rows"):
        RunConfig(adapter="json", strategy="p -> w")
    assert RunConfig(adapter="json", strategy="p -> p").adapter == "json"


def test_the_servers_lm_takes_the_constrained_adapters_regex():
    from actors.dspy_side.client import STRUCTURED_KEY
    from engine.adapters.constrained import ConstrainedChatAdapter
    from serve.deployments import HandleEngine, SyncHandleEngine

    served = dspy.LM("m", engine=SyncHandleEngine(None), async_engine=HandleEngine(None), max_tokens=64)
    kwargs = {}
    ConstrainedChatAdapter()._call_preprocess(served, kwargs, dspy.Signature("q -> a"), {"q": "x"})
    assert "regex" in kwargs["metadata"][STRUCTURED_KEY] and kwargs["stop"] is None
    with pytest.raises(ValueError, match="does not declare supports_structured_outputs"):
        ConstrainedChatAdapter()._call_preprocess(dspy.LM("openai/x"), {}, dspy.Signature("q -> a"), {"q": "x"})


def test_a_run_dir_names_its_adapter_for_the_server(tmp_path):
    from engine.store.run_store import RunStore
    from serve.winner import Winner

    store = RunStore(tmp_path, RunConfig(adapter="json", strategy="p").fingerprint())
    base = dict(run_dir=tmp_path, program="iris", base_model="m", strategy="", score=None, models={}, program_args={},
                adapters={}, max_tokens=8, max_model_len=64, version="v", program_file=tmp_path / "program.json")
    assert Winner(**base, settings=store.settings()).adapter == "json"
    assert Winner(**base, settings={}).adapter == "chat"  # a run dir from before the setting


def test_a_constrained_run_whose_max_tokens_cannot_hold_the_answer_fails_before_starting(caplog, tmp_path):
    from engine.adapters.registry import check_fits
    from engine.cli import main
    from programs import iris

    with pytest.raises(ValueError, match="adapter 'constrained', predictor 'predict.predict'|adapter 'constrained', "
                                         "predictor 'predict'"):
        check_fits("constrained", iris.Program(), 16)
    check_fits("constrained", iris.Program(), 200)
    check_fits("chat", iris.Program(), 16)
    run_dir = tmp_path / "run"
    assert main(["run", "--max-tokens", "16", "--run-dir", str(run_dir)]) == 1
    assert "max_tokens=16 leaves no room for the free-text fields" in caplog.text and "--adapter chat" in caplog.text
    assert [p.name for p in run_dir.iterdir()] == ["logs"]  # no run.json: nothing a rerun would take as started
    assert f"(full log: {run_dir / 'logs' / 'tandem.log'})" in caplog.text
