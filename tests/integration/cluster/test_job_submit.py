"""`ray job submit` against a real local head, as the README's cluster section says.

A head is started with `ray start --head` on free ports in its own temp dir, with token
authentication on (Ray 2.60 turns it on for `ray start` whenever a token file exists, and the
`ray job` CLI then needs `RAY_AUTH_MODE=token` to send it). A small Iris run (the tiny model, one
prompt step) is submitted with `cluster/runtime_env.local.yaml` and must reach SUCCEEDED having
joined that cluster (not started its own) and copied its run dir to the configured storage; a job
asking for GPUs the cluster does not have must fail within seconds with the reason in its last log
line. The head (every process carrying its test mark) is stopped at the end.
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from actors.runtime import CHILD_CLEANUP
from tests.integration.ports import free_port
from tests.integration.processes import kill_marked, marked_env, new_mark

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
RAY = str(Path(sys.executable).parent / "ray")


class Head:
    """A local head's dashboard address, its token, and the environment the `ray` CLI needs."""

    def __init__(self, address: str, token: str, env: dict):
        self.address, self.token, self.env = address, token, env

    def submit(self, job_id: str, *args: str) -> None:
        subprocess.run([RAY, "job", "submit", "--address", self.address, "--submission-id", job_id, "--no-wait",
                        "--working-dir", ".", "--runtime-env", "cluster/runtime_env.local.yaml", "--",
                        "python", "-m", "engine", *args], cwd=ROOT, env=self.env, check=True,
                       capture_output=True, timeout=120)

    def _get(self, path: str):
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def wait(self, job_id: str, timeout_s: float) -> tuple[str, str]:
        """The job's final status and its logs; fails the test if it is still running at ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self._get(f"/api/jobs/{job_id}")["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status, self._get(f"/api/jobs/{job_id}/logs")["logs"]
            time.sleep(2)
        subprocess.run([RAY, "job", "stop", "--address", self.address, job_id], env=self.env, capture_output=True)
        logs = self._get(f"/api/jobs/{job_id}/logs")["logs"]
        pytest.fail(f"job {job_id} still {status} after {timeout_s}s:\n{logs[-3000:]}")


@pytest.fixture(scope="module")
def head(tiny_model):
    import ray

    if ray.is_initialized():  # free the cores of the test session's own Ray
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rayh")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    (Path(temp) / "token").write_text(token)
    port, dashboard = free_port(), free_port()
    mark = new_mark()  # on every process of this head: stopped at the end without touching other Rays
    env = marked_env(mark, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="token",
                     RAY_AUTH_TOKEN_PATH=str(Path(temp) / "token"), **{CHILD_CLEANUP: "1"})
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    yield Head(f"http://127.0.0.1:{dashboard}", token, env)
    kill_marked(mark)


def test_a_small_iris_run_succeeds_and_an_impossible_one_fails_fast(head, tmp_path):
    config = tmp_path / "iris_small.yaml"
    config.write_text(yaml.safe_dump({
        "program": "iris", "model": "tiny-llama", "strategy": "p", "train_size": 6, "val_size": 3, "replicas": 1,
        "max_tokens": 16, "adapter": "chat", "threads": 8, "run_dir": str(tmp_path / "run"),
        "storage": (tmp_path / "store").as_uri(),
        "prompt": {"num_candidate_programs": 1, "max_bootstrapped_demos": 1, "max_labeled_demos": 2}}))
    head.submit("tandem-small", "run", "--config", str(config))
    status, logs = head.wait("tandem-small", 600)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "joined Ray cluster" in logs and "started a local Ray" not in logs  # the job's cluster, not a new one
    best = json.loads((tmp_path / "store" / "best.json").read_text())  # the run dir reached the storage
    scores = {name: json.loads((tmp_path / "store" / name / "step.json").read_text())["score"]
              for name in ("00_baseline", "01_p")}
    assert best["program"] == "iris" and best["score"] == max(scores.values())
    assert best["strategy"] == ("" if scores["00_baseline"] >= scores["01_p"] else "p")  # ties keep the earlier
    assert (tmp_path / "store" / "01_p" / "step.json").is_file() and (tmp_path / "store" / "report.md").is_file()

    started = time.monotonic()
    head.submit("tandem-gpu", "run", "--config", str(config), "--gpus-per-replica", "1",
                "--run-dir", str(tmp_path / "run-gpu"))
    status, logs = head.wait("tandem-gpu", 180)
    assert status == "FAILED" and time.monotonic() - started < 120, logs[-2000:]
    last = logs.strip().splitlines()[-1]
    assert "tandem run failed" in last and "replica 0 needs 1 CPU, 1 GPU" in last, logs[-2000:]
    assert [p.name for p in (tmp_path / "run-gpu").iterdir()] == ["logs"]  # failed before any step was written
    assert f"(full log: {tmp_path / 'run-gpu' / 'logs' / 'tandem.log'})" in last
