"""The suite's one `tandem run` on SmolLM2-135M (Iris, p -> w -> p, small budget), through the CLI.

Shared by the run tests (which check the run, its console, costs and MLflow record) and the serve
test (which serves its fine-tuned step), so the suite pays for one real run, not two. Resuming a
stopped run is tested on the tiny model (``tests/integration/engine/test_user_program.py``: SIGTERM
in the weight step, then the same command again).
"""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.integration.processes import kill_marked, left_behind, marked_env, new_mark

CONFIG = {
    "program": "iris", "model": "smollm2-135m-instruct", "strategy": "p -> w -> p", "seed": 0,
    "train_size": 16, "val_size": 8, "test_size": 12, "replicas": 2, "max_tokens": 200, "threads": 16,
    "prompt": {"num_candidate_programs": 1, "max_bootstrapped_demos": 2, "max_labeled_demos": 3},
    "lora": {"rank": 8, "alpha": 16, "epochs": 1, "lr": 1e-4, "cpus_per_worker": 2, "micro_batch_size": 4},
}


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    out: str  # what the run printed (its console)
    returncode: int
    left: list[str]  # processes of the run still alive after it exited (then killed)


def finished_run(home: Path) -> FinishedRun:
    run_dir = home / "rundir"
    (home / "iris.yaml").write_text(yaml.safe_dump({**CONFIG, "run_dir": str(run_dir)}))
    mark = new_mark()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "run", "--config", str(home / "iris.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=marked_env(mark))
    try:
        out, _ = proc.communicate(timeout=1200)
        left = left_behind(mark)
    finally:
        kill_marked(mark)  # nothing of a failed or timed-out run is left for the rest of the session
    return FinishedRun(run_dir, out, proc.returncode, left)
