"""`ray job submit` against a real two-node cluster on this machine, as the README's cluster section says.

A head is started with `ray start --head` on free ports in its own temp dir, with token
authentication on (Ray 2.60 turns it on for `ray start` whenever a token file exists, and the
`ray job` CLI then needs `RAY_AUTH_MODE=token` to send it), offering a custom resource `training`;
a second node joins it with `ray start --address`, offering `inference`. A stranger's program (a
module shipped with the job's `py_modules`, not in `programs/`) runs `p -> w` on the tiny model in the
`hotswap` lifecycle, submitted with `cluster/runtime_env.local.yaml`: the replica must run on the
inference node and keep serving while the Ray Train worker trains on the training node (read back
from the cluster's state API), then serve the adapter it was sent through the object store; the run dir reached
only through its `storage:` URI in another dir (Ray Train's checkpoints there too), and the job must
reach SUCCEEDED having joined that cluster (not started its own). A job asking for GPUs the cluster
does not have must fail within seconds with the reason in its last log line. Every process carrying
the test's mark (both nodes) is stopped at the end.
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

    def submit(self, job_id: str, *args: str, runtime_env: Path | None = None) -> None:
        subprocess.run([RAY, "job", "submit", "--address", self.address, "--submission-id", job_id, "--no-wait",
                        "--working-dir", ".", "--runtime-env", str(runtime_env or "cluster/runtime_env.local.yaml"),
                        "--", "python", "-m", "engine", *args], cwd=ROOT, env=self.env, check=True,
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
                    "--resources", json.dumps({"training": 1}), "--include-dashboard=true", f"--temp-dir={temp}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--resources",
                    json.dumps({"inference": 1}), f"--dashboard-agent-listen-port={free_port()}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    yield Head(f"http://127.0.0.1:{dashboard}", token, env)
    kill_marked(mark)


def _state(head: Head, kind: str) -> list[dict]:
    """Ray's state API over the dashboard (dead actors included): ``actors`` or ``nodes``."""
    return head._get(f"/api/v0/{kind}?detail=true&limit=10000")["data"]["result"]["result"]


STRANGER = (Path(__file__).parents[1] / "stranger_program.py").read_text()  # a module of the user's


def test_replicas_and_training_land_on_their_nodes_and_an_impossible_job_fails_fast(head, tmp_path):
    package = tmp_path / "modules" / "stranger_prog"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STRANGER)
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.local.yaml").read_text())
    runtime_env["py_modules"] = [str(package)]  # the user's program travels with the job
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    config = tmp_path / "stranger.yaml"
    config.write_text(yaml.safe_dump({
        "program": "stranger_prog", "model": "tiny-llama", "strategy": "p -> w", "train_size": 8, "val_size": 4,
        "test_size": 4, "replicas": 1, "max_tokens": 8, "adapter": "chat", "threads": 8, "lifecycle": "hotswap",
        "run_dir": str(tmp_path / "run"), "storage": (tmp_path / "store").as_uri(),
        "replica_resources": {"inference": 1},
        "prompt": {"num_candidate_programs": 1, "max_bootstrapped_demos": 1, "max_labeled_demos": 2},
        "lora": {"rank": 8, "alpha": 16, "epochs": 1, "lr": 1e-3, "cpus_per_worker": 1, "max_seq_len": 256,
                 "resources": {"training": 1}}}))
    head.submit("tandem-two-nodes", "run", "--config", str(config), runtime_env=tmp_path / "runtime_env.yaml")
    status, logs = head.wait("tandem-two-nodes", 600)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "joined Ray cluster" in logs and "started a local Ray" not in logs  # the job's cluster, not a new one

    nodes = {n["node_id"]: n["resources_total"] for n in _state(head, "nodes")}
    inference = next(i for i, r in nodes.items() if "inference" in r)
    training = next(i for i, r in nodes.items() if "training" in r)
    actors = _state(head, "actors")
    replicas = [a for a in actors if a["class_name"] == "LMReplica"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(replicas) == 1 and replicas[0]["node_id"] == inference  # kept serving while the other node trained
    assert workers and all(a["node_id"] == training for a in workers)

    store = tmp_path / "store"
    w = json.loads((store / "02_w" / "step.json").read_text())  # the run dir reached the storage
    (trained,) = w["extra"]["trained"]
    assert trained["adapter"].startswith("tiny-llama:ft-02-") and w["extra"]["rows"] > 0
    assert (store / "adapters" / Path(trained["adapter_path"]).name / "adapter_model.safetensors").is_file()
    assert list((store / "ray_train" / "ft-02").iterdir())  # Ray Train's checkpoints went to the storage URI
    assert json.loads((store / "best.json").read_text())["program"] == "stranger_prog"
    assert not (tmp_path / "run" / "ray_train").exists()

    started = time.monotonic()
    head.submit("tandem-gpu", "run", "--config", str(config), "--gpus-per-replica", "1",
                "--run-dir", str(tmp_path / "run-gpu"), runtime_env=tmp_path / "runtime_env.yaml")
    status, logs = head.wait("tandem-gpu", 180)
    assert status == "FAILED" and time.monotonic() - started < 120, logs[-2000:]
    last = logs.strip().splitlines()[-1]
    assert "tandem run failed" in last and "replica 0 needs 1 CPU, 1 GPU" in last, logs[-2000:]
    assert [p.name for p in (tmp_path / "run-gpu").iterdir()] == ["logs"]  # failed before any step was written
    assert f"(full log: {tmp_path / 'run-gpu' / 'logs' / 'tandem.log'})" in last


def test_two_runs_submitted_at_once_share_the_cluster_and_score_as_alone(head, tmp_path):
    package = tmp_path / "modules" / "stranger_prog"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STRANGER)
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.local.yaml").read_text())
    runtime_env["py_modules"] = [str(package)]
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    config = tmp_path / "twin.yaml"
    config.write_text(yaml.safe_dump({
        "program": "stranger_prog", "model": "tiny-llama", "strategy": "p", "train_size": 8, "val_size": 6,
        "test_size": 4, "replicas": 1, "cpus_per_replica": 0.5, "max_tokens": 8, "adapter": "chat", "threads": 8,
        "prompt": {"num_candidate_programs": 1, "max_bootstrapped_demos": 1, "max_labeled_demos": 2}}))
    for twin in ("a", "b"):  # the same run twice, in two run dirs, at the same time (they took one name before)
        head.submit(f"tandem-twin-{twin}", "run", "--config", str(config), "--run-dir", str(tmp_path / twin),
                    runtime_env=tmp_path / "runtime_env.yaml")
    results = [head.wait(f"tandem-twin-{twin}", 600) for twin in ("a", "b")]
    assert [status for status, _ in results] == ["SUCCEEDED", "SUCCEEDED"], results[0][1][-2000:] + results[1][1][-2000:]
    scores = [{p.name: json.loads((p / "step.json").read_text())["score"] for p in sorted((tmp_path / t).glob("0*_*"))}
              for t in ("a", "b")]
    assert scores[0] == scores[1] and set(scores[0]) == {"00_baseline", "01_p"}  # what each gets alone: the same
    pools = {a["name"].split(":")[1] for a in _state(head, "actors") if a["class_name"] == "LMReplica"}
    assert any(p.startswith("run-a-") for p in pools) and any(p.startswith("run-b-") for p in pools)  # one each
