"""A teacher model group, end to end through the CLI on real parts: the student is the tiny random
Llama, the teacher SmolLM2-135M on a replica of its own (``--model-group big={model: ...}``), and the
weight step bootstraps its traces on the teacher (``--step w={teacher: big}``).

The program's metric passes half the examples whatever the model says (a random student cannot pass
a real one), so what is tested is where the calls go and when the teacher is up: the bootstrapping
requests reach the teacher's replica (counted to it in ``best.json``), the training rows are the
teacher's completions, the teacher is released once its traces are in (before training, which needs
its CPU on this 2-core machine), the student is fine-tuned and nothing of either pool is left.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.integration.processes import kill_marked, left_behind, marked_env, new_mark

pytestmark = pytest.mark.integration

PROGRAM = (Path(__file__).parents[1] / "stranger_program.py").read_text()


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tiny_model, smollm2_model):
    import ray

    if ray.is_initialized():  # the CLI starts its own local Ray: free the session's cores
        ray.shutdown()
    home = tmp_path_factory.mktemp("groups")
    (home / "groupprog.py").write_text(PROGRAM)
    mark = new_mark()
    argv = [sys.executable, "-m", "engine", "run", "--program", "groupprog", "--model", "tiny-llama",
            "--model-group", "big={model: smollm2-135m-instruct, replicas: 1, max_tokens: 16}",
            "--step", "w={teacher: big}", "--strategy", "w", "--replicas", "1", "--train-size", "8",
            "--val-size", "4", "--test-size", "-1", "--max-tokens", "8", "--adapter", "chat", "--threads", "8",
            "--lora-rank", "8", "--lora-alpha", "16", "--lora-epochs", "1", "--lora-cpus-per-worker", "1",
            "--lora-max-seq-len", "256", "--no-tracking", "--run-dir", "runs/taught"]
    proc = subprocess.Popen(argv, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=marked_env(mark, PYTHONPATH=f"{home}{os.pathsep}{Path.cwd()}"))
    try:
        out, _ = proc.communicate(timeout=900)
        left = left_behind(mark)
    finally:
        kill_marked(mark)
    return home / "runs" / "taught", out, proc.returncode, left


def test_the_weight_step_trains_the_student_on_the_teachers_traces(taught):
    run_dir, out, code, left = taught
    assert code == 0, out[-4000:]
    assert left == []
    step = json.loads((run_dir / "01_w" / "step.json").read_text())
    assert step["extra"]["teacher"] is True and step["extra"]["teacher_model"] == "smollm2-135m-instruct"
    assert step["extra"]["passing_traces"] == 4  # 8 examples, the even ones pass
    rows = pq.read_table(run_dir / "01_w" / "traces.parquet").to_pylist()
    assert len(rows) == 4
    assert step["models"]["answer"].startswith("tiny-llama:ft-01-")  # the student was fine-tuned
    best = json.loads((run_dir / "best.json").read_text())
    by_model = best["costs"]["by_model"]
    assert by_model["big"]["requests"] == 8  # every bootstrapping run went to the teacher's replica
    assert by_model["big"]["replica_s"] > 0
    assert by_model["student"]["requests"] >= 4  # the baseline and the tuned program on the valset


def test_the_teacher_is_up_only_while_its_traces_are_made(taught):
    run_dir, _, _, _ = taught
    log = (run_dir / "logs" / "tandem.log").read_text()
    launched = log.index("model group 'big' (smollm2-135m-instruct, 1 replica(s)): launching for step 1 (w)")
    released = log.index("model group 'big': released during step 1, its last use done")
    rows = log.index("weight step: 4 chat rows from 4 passing traces of 8 examples")
    trained = log.index("trained ft-01 in ")
    assert launched < released < rows < trained  # the teacher's CPU is free before training starts
