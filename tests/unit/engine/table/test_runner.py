"""The paper-table harness's pure logic: strategy lists, run order, the table files; and the CLI's flags."""

import csv
import json

import pytest

from engine.cli import _pairs, build_parser
from engine.table.config import Cell, TableConfig, normalize, plan
from engine.table.report import summarize, write_table


def test_normalize_canonicalizes_and_refuses_bad_lists():
    assert normalize(["vanilla", "p->w", " p ->  w -> p "]) == ["vanilla", "p -> w", "p -> w -> p"]
    with pytest.raises(ValueError, match="listed twice: \\['p -> w'\\]"):
        normalize(["p -> w", "p->w"])
    with pytest.raises(ValueError, match="invalid optimizer keys: \\['x'\\]"):
        normalize(["p -> x"])
    with pytest.raises(ValueError, match="no strategies"):
        normalize([])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        TableConfig(seeds=(0, 0))


def test_plan_runs_prefixes_first_and_continues_the_longest_one():
    order = plan(["p -> w -> p", "w -> p", "p", "vanilla", "p -> w", "w", "p -> p"])
    assert [s for s, _ in order] == ["vanilla", "p", "w", "w -> p", "p -> w", "p -> p", "p -> w -> p"]
    parents = dict(order)
    assert parents == {"vanilla": None, "p": None, "w": None, "w -> p": "w", "p -> w": "p", "p -> p": "p",
                       "p -> w -> p": "p -> w"}
    # 'p -> p' is not a prefix of 'p -> w -> p'; without 'p' listed, 'p -> w' starts from scratch
    assert dict(plan(["p -> w", "w"]))["p -> w"] is None


def _cells():
    return [Cell("vanilla", 0, 10.0, 0.0, None, "/r", 1.0), Cell("vanilla", 1, 20.0, 0.0, None, "/r", 1.0),
            Cell("p", 0, 50.0, 40.0, None, "/r", 5.0), Cell("p", 1, 70.0, 60.0, None, "/r", 5.0),
            Cell("w", 0, None, None, "step 'w' failed: NoTrainingDataError: no passing traces", "/r", 2.0),
            Cell("w", 1, 30.0, 20.0, None, "/r", 9.0)]


def test_summary_means_over_scored_seeds():
    rows = {r["strategy"]: r for r in summarize(_cells())}
    assert rows["p"]["mean"] == 60.0 and rows["p"]["std"] == 10.0 and rows["p"]["n"] == 2
    assert rows["w"]["mean"] == 30.0 and rows["w"]["n"] == 1 and rows["w"]["scores"][0] is None


def test_table_files_are_well_formed(tmp_path):
    paths = write_table(_cells(), tmp_path, "iris on tiny", {"seeds": [0, 1]})
    md = paths["md"].read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| strategy"))
    assert md[header] == "| strategy | mean | seed 0 | seed 1 |"
    assert md[header + 2] == "| `vanilla` | 15.0 | 10.0 | 20.0 |"
    assert md[header + 4] == "| `w` | 30.0 (1/2 seeds) | – [1] | 30.0 |"
    assert "[1] step 'w' failed: NoTrainingDataError: no passing traces" in md
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 6 and rows[4]["test_score"] == "" and "no passing traces" in rows[4]["reason"]
    data = json.loads(paths["json"].read_text())
    assert data["settings"] == {"seeds": [0, 1]} and len(data["cells"]) == 6
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_key_value_flags():
    assert _pairs(["path=/data/gsm8k", "train_size=20", "retriever=bm25:c.jsonl"]) == {
        "path": "/data/gsm8k", "train_size": 20, "retriever": "bm25:c.jsonl"}
    with pytest.raises(ValueError, match="expected KEY=VALUE, got 'oops'"):
        _pairs(["oops"])


def test_table_command_takes_no_single_run_flags():
    args = build_parser().parse_args(["table", "--strategies", "vanilla,p", "--seeds", "1", "--data-arg", "a=1"])
    assert args.strategies == "vanilla,p" and args.seeds == (0,) and args.data_arg == ["a=1"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["table", "--strategy", "p"])


def test_table_command_refuses_a_bad_strategy_before_starting_anything(caplog, tmp_path):
    from engine.cli import main

    assert main(["table", "--strategies", "vanilla,p -> x", "--seeds", "1", "--out", str(tmp_path)]) == 1
    assert "Strategy contains invalid optimizer keys: ['x']" in caplog.text


def test_a_stored_cell_made_with_other_settings_is_refused(tmp_path):
    from engine.config import RunConfig
    from engine.table.runner import _cell

    cfg = RunConfig(run_dir=str(tmp_path / "cell"), strategy="p")
    test = [object()] * 4
    (tmp_path / "cell").mkdir()
    stored = {"test_score": 50.0, "dev_score": 40.0, "reason": None, "wall_s": 1.0,
              "settings": json.loads(json.dumps({**cfg.fingerprint(), "test_size": 4}))}
    (tmp_path / "cell" / "test.json").write_text(json.dumps(stored))
    assert _cell(cfg, None, None, None, test, "p", None, {}).test_score == 50.0  # same settings: resumed
    with pytest.raises(ValueError, match="other settings \\(test_size\\)"):
        _cell(cfg, None, None, None, test[:3], "p", None, {})
    with pytest.raises(ValueError, match="other settings \\(train_size\\)"):
        _cell(cfg.with_overrides(train_size=10), None, None, None, test, "p", None, {})
