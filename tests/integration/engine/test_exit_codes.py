"""Exit code 2 through the CLI, on real parts: a run whose weight step fails keeps the best program before
it. The tiny random model under DSPy's ChatAdapter writes no field markers, so no Iris run parses, the
weight step has no passing trace and fails (NoTrainingDataError): `tandem run` exits 2, names the failed
step and why in its last line, and leaves a finished run dir (the baseline as the winner, best.json marking
the failure, no half-written step), with nothing left running."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.processes import kill_marked, left_behind, marked_env, new_mark

pytestmark = pytest.mark.integration


def test_a_failed_weight_step_exits_2_keeping_the_baseline(tmp_path, tiny_model):
    import ray

    if ray.is_initialized():  # the CLI starts its own local Ray: free the session's cores
        ray.shutdown()
    mark = new_mark()
    argv = [sys.executable, "-m", "engine", "run", "--model", "tiny-llama", "--strategy", "w", "--replicas", "1",
            "--train-size", "6", "--val-size", "4", "--test-size", "-1", "--max-tokens", "8", "--adapter", "chat",
            "--threads", "8", "--no-tracking", "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(argv, cwd=Path.cwd(), env=marked_env(mark), capture_output=True, text=True, timeout=600)
    try:
        assert left_behind(mark) == []
    finally:
        kill_marked(mark)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "step 'w' failed: NoTrainingDataError: no passing traces" in last, last
    assert "the best program before it ('baseline') was kept" in last
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["strategy"] == "" and best["failed_step"] is True
    committed = sorted(p.name for p in (tmp_path / "run").glob("0*") if not p.name.endswith(".tmp"))
    assert committed == ["00_baseline"]  # the failed step is not passed off as done
