"""`tandem run` end to end on SmolLM2-135M (small budget): p -> w -> p, killed and resumed.

The driver process is killed once the first prompt step is stored; the rerun on the same run dir
must skip the stored steps, fine-tune, relaunch the replicas with the adapter, and finish with
the report, chart and winning program.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.processes import kill_marked, marked_env, new_mark

pytestmark = pytest.mark.integration

CONFIG = {
    "program": "iris", "model": "smollm2-135m-instruct", "strategy": "p -> w -> p", "seed": 0,
    "train_size": 24, "val_size": 8, "replicas": 2, "max_tokens": 200, "threads": 16,
    "prompt": {"num_candidate_programs": 2, "max_bootstrapped_demos": 2, "max_labeled_demos": 3},
    "lora": {"rank": 8, "alpha": 16, "epochs": 1, "lr": 1e-4, "cpus_per_worker": 2, "micro_batch_size": 4},
}


def _tandem(args, mark, **kw):
    return subprocess.Popen([sys.executable, "-m", "engine", *args], stdout=subprocess.PIPE, env=marked_env(mark),
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def config(tmp_path_factory, smollm2_model):
    import ray

    if ray.is_initialized():  # the CLI starts its own local Ray; free the cores of the test session's
        ray.shutdown()
    d = tmp_path_factory.mktemp("run")
    (d / "iris.yaml").write_text(yaml.safe_dump({**CONFIG, "run_dir": str(d / "rundir")}))
    return d


def test_killed_run_resumes_and_finishes(config):
    run_dir = config / "rundir"
    mark = new_mark()
    first = _tandem(["run", "--config", str(config / "iris.yaml")], mark, start_new_session=True)
    deadline = time.time() + 600
    while not (run_dir / "01_p" / "step.json").exists():
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "first step did not finish in time"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies between steps, without any cleanup
    first.wait()
    kill_marked(mark)  # its local Ray and replicas, orphaned; nobody else's
    stored = json.loads((run_dir / "01_p" / "step.json").read_text())

    second = _tandem(["run", "--config", str(config / "iris.yaml")], new_mark())
    out, _ = second.communicate(timeout=1200)
    assert second.returncode == 0, out[-3000:]
    assert "00_baseline (baseline): done in an earlier run" in out
    assert "01_p (p): done in an earlier run" in out
    assert json.loads((run_dir / "01_p" / "step.json").read_text()) == stored  # not redone

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
    import re

    report = (run_dir / "report.md").read_text()
    assert len(re.findall(r"^\| \d\d_\w+ \| `", report, flags=re.M)) == 4  # a row per step
    assert (run_dir / "scores.png").stat().st_size > 1000
    program = json.loads((run_dir / "program.json").read_text())
    assert program["predict"]["lm"] is None
