"""The suite's one `tandem run` on SmolLM2-135M (Iris, p -> w -> p, small budget), killed and resumed.

Shared by the resume test (which checks the run) and the serve test (which serves its fine-tuned
step), so the suite pays for one real run, not two. The driver is killed hard (SIGKILL to its
process group) once the first prompt step is stored; the rerun on the same run dir must skip the
stored steps and finish.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.integration.processes import kill_marked, marked_env, new_mark

CONFIG = {
    "program": "iris", "model": "smollm2-135m-instruct", "strategy": "p -> w -> p", "seed": 0,
    "train_size": 16, "val_size": 8, "test_size": 12, "replicas": 2, "max_tokens": 200, "threads": 16,
    "prompt": {"num_candidate_programs": 1, "max_bootstrapped_demos": 2, "max_labeled_demos": 3},
    "lora": {"rank": 8, "alpha": 16, "epochs": 1, "lr": 1e-4, "cpus_per_worker": 2, "micro_batch_size": 4},
}


@dataclass(frozen=True)
class KilledAndResumed:
    run_dir: Path
    stored_01_p: dict  # 01_p/step.json as the killed run left it
    out: str  # what the resumed run printed
    returncode: int


def _tandem(args: list[str], mark: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", *args], stdout=subprocess.PIPE, env=marked_env(mark),
                            stderr=subprocess.STDOUT, text=True, **kw)


def killed_and_resumed(home: Path) -> KilledAndResumed:
    run_dir = home / "rundir"
    (home / "iris.yaml").write_text(yaml.safe_dump({**CONFIG, "run_dir": str(run_dir)}))
    mark = new_mark()
    first = _tandem(["run", "--config", str(home / "iris.yaml")], mark, start_new_session=True)
    deadline = time.time() + 600
    while not (run_dir / "01_p" / "step.json").exists():
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "first step did not finish in time"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies between steps, without any cleanup
    first.wait()
    kill_marked(mark)  # its local Ray and replicas, orphaned; nobody else's
    stored = json.loads((run_dir / "01_p" / "step.json").read_text())
    second = _tandem(["run", "--config", str(home / "iris.yaml")], new_mark())
    out, _ = second.communicate(timeout=1200)
    return KilledAndResumed(run_dir, stored, out, second.returncode)
