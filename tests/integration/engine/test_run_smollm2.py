"""`tandem run` end to end on SmolLM2-135M (small budget): p -> w -> p through the CLI.

The run is the session's shared one (``tests/integration/iris_run.py``): it must have fine-tuned,
relaunched the replicas with the adapter, and finished with the report, chart and winning program,
each step scored on held-out test examples, leaving no process behind; its console is short, its
log has the rest, and every step says what it spent.
"""

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_the_run_finishes_with_every_step_and_leaves_nothing_running(iris_smollm2_run):
    run_dir, out = iris_smollm2_run.run_dir, iris_smollm2_run.out
    assert iris_smollm2_run.returncode == 0, out[-3000:]
    assert iris_smollm2_run.left == []

    steps = sorted(p.name for p in run_dir.iterdir() if p.name[:2].isdigit())
    assert steps == ["00_baseline", "01_p", "02_w", "03_p"], (steps, out[-3000:])
    w = json.loads((run_dir / "02_w" / "step.json").read_text())
    (trained,) = w["extra"]["trained"]
    adapter = trained["adapter"]
    assert adapter.startswith("smollm2-135m-instruct:ft-02-") and w["models"] == {"predict": adapter}
    assert Path(trained["adapter_path"], "adapter_model.safetensors").is_file()
    assert w["extra"]["lifecycle"] == "relaunch" and w["extra"]["rows"] > 0
    last = json.loads((run_dir / "03_p" / "step.json").read_text())
    assert last["models"] == {"predict": adapter}  # the next prompt step runs on the fine-tuned LM
    best = json.loads((run_dir / "best.json").read_text())
    records = [json.loads((run_dir / name / "step.json").read_text()) for name in steps]
    top = max(r["score"] for r in records)
    assert best["score"] == top  # the winner is the best on the valset, the earliest of equals
    assert best["strategy"] == next(r["strategy"] for r in records if r["score"] == top)
    tests = {name: json.loads((run_dir / name / "test.json").read_text()) for name in steps}
    assert all(t["n"] == 12 and t["parse_failures"] + t["errors"] + t["answered"] <= 12 for t in tests.values())
    assert all(t["errors"] == 0 and t["field"] == "answer" and t["gold_distinct"] == 3 for t in tests.values())
    winner = next(name for name, r in zip(steps, records) if r["strategy"] == best["strategy"])
    assert best["test_score"] == tests[winner]["score"] and tests[winner]["answered"] > 0
    assert re.search(r"^\| (\(baseline\)|p|p -> w|p -> w -> p) +\| [\d.]+ +\| [\d.]+ +\| ", out, flags=re.M), out[-2000:]
    report = (run_dir / "report.md").read_text()
    assert len(re.findall(r"^\| \d\d_\w+ \| `.*\(n=12\)", report, flags=re.M)) == 4  # a row per step, tested
    assert "the valset has 8 examples (under 30)" in report
    assert re.search(r"Fine-tuning in `02_w`.*loss per epoch \[[\d.]+\] \(lr \[.+\], grad norm \[.+\]\), \d+ optimizer "
                     r"steps.*trained on vanilla prompts", report), report
    assert (run_dir / "scores.png").stat().st_size > 1000
    program = json.loads((run_dir / "program.json").read_text())
    assert program["predict"]["lm"] is None


def test_the_console_is_short_and_the_log_has_everything(iris_smollm2_run):
    """What the run printed is Tandem's own lines and the table; vLLM's, Ray's and Ray Train's
    output went to RUN_DIR/logs/tandem.log."""
    run_dir, out = iris_smollm2_run.run_dir, iris_smollm2_run.out
    lines = out.splitlines()
    assert len(lines) < 40, out
    assert not any(noise in out for noise in ("EngineCore", "(LMReplica", "RayTrainWorker", "Started a local Ray"))
    assert f"full log: {run_dir / 'logs' / 'tandem.log'}" in out
    log = (run_dir / "logs" / "tandem.log").read_text()
    assert log.count("Started a local Ray") == 1
    assert "EngineCore" in log and "RayTrainWorker" in log and "step 'p -> w -> p'" in log


def test_each_step_and_the_run_say_what_they_spent(iris_smollm2_run):
    run_dir = iris_smollm2_run.run_dir
    spent = {name: json.loads((run_dir / name / "step.json").read_text())["extra"]["costs"]
             for name in ("00_baseline", "01_p", "02_w", "03_p")}
    assert spent["00_baseline"]["lm_calls"] == 8  # one call per valset example
    assert all(s["requests"] + s["cache_hits"] == s["lm_calls"] for s in spent.values())
    assert all(s["prompt_tokens"] > 0 and s["completion_tokens"] > 0 for s in spent.values())  # a fresh DSPy cache
    assert spent["02_w"]["train_device_s"] > 0 and spent["02_w"]["replica_s"] > 0  # trained, then relaunched
    assert spent["03_p"]["train_device_s"] == 0 and spent["03_p"]["lm_calls"] > spent["00_baseline"]["lm_calls"]
    best = json.loads((run_dir / "best.json").read_text())
    assert best["test_costs"]["lm_calls"] == 4 * 12  # every step's program on the 12 test examples
    assert best["costs"]["lm_calls"] == sum(s["lm_calls"] for s in spent.values()) + best["test_costs"]["lm_calls"]
    assert best["costs"]["replica_s"] > spent["02_w"]["replica_s"]  # the launch before the first step counts too
    assert re.search(r"^\| p -> w +\|.*\| \d+ LM calls \(\d+ cached\), [\d.k]+\+[\d.k]+ tokens, \d+ replica-s, "
                     r"\d+ train device-s +\|", iris_smollm2_run.out, flags=re.M), iris_smollm2_run.out


def test_the_run_is_tracked_in_mlflow_beside_its_run_dir(iris_smollm2_run):
    """The default store: sqlite beside the run dir; a parent run, a nested run per step, the
    weight step's loss per epoch, the winner as a model."""
    from mlflow.tracking import MlflowClient

    run_dir, out = iris_smollm2_run.run_dir, iris_smollm2_run.out
    uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in out
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tandem")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`tandem.kind` = 'run'")
    assert parent.data.tags["tandem.run_dir"] == str(run_dir) and parent.info.status == "FINISHED"
    assert parent.data.params["strategy"] == "p -> w -> p" and parent.data.params["lora.epochs"] == "1"
    best = json.loads((run_dir / "best.json").read_text())
    assert parent.data.metrics["best_valset_score"] == best["score"]
    children = {r.data.tags["tandem.step"]: r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert sorted(children) == ["00_baseline", "01_p", "02_w", "03_p"]
    step = json.loads((run_dir / "02_w" / "step.json").read_text())
    (trained,) = step["extra"]["trained"]
    losses = [m.value for m in client.get_metric_history(children["02_w"].info.run_id, "train.loss")]
    assert losses == pytest.approx(trained["train_metrics"]["loss_history"])
    assert children["02_w"].data.metrics["test_score"] == json.loads((run_dir / "02_w" / "test.json").read_text())["score"]
    artifacts = {a.path for a in client.list_artifacts(children["02_w"].info.run_id)}
    assert {"step.json", "test.json", "traces.parquet", "adapter"} <= artifacts
    assert "program" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert children["02_w"].data.metrics["costs.train_device_s"] == step["extra"]["costs"]["train_device_s"]
    assert parent.data.metrics["costs.lm_calls"] == best["costs"]["lm_calls"] > 0
