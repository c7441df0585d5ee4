"""A Ray Train worker SIGKILLed while the worker group starts is retried within ``lora.max_failures``
(issue 17, fault matrix row ``train_worker_kill``), on real Ray Train with the tiny model.

The kill is no race: ``KillFirstWorkerAtStart``, a Ray Train callback installed through Ray's own
``RAY_TRAIN_CALLBACKS`` variable, runs in the controller between the worker actors' creation and
their train-context set-up and SIGKILLs rank 0's process the first time only (what
``benchmarks/faults.py`` does from outside when it sees the worker's title), writing its pid to the
file ``$TANDEM_TEST_KILLED`` named. Stock Ray counts that as a controller error, which Tandem does
not retry (``actors.train_retry``).
"""

import contextlib
import os
import signal
from pathlib import Path

import psutil
import pytest
from ray.train import ControllerError
from ray.train.v2._internal.execution.callback import WorkerGroupCallback

from actors.training.loop import train_lora
from actors.training.rows import write_rows
from tests.integration.conftest import lora_b_moved, tiny_train_config

pytestmark = pytest.mark.integration

KILLED_ENV = "TANDEM_TEST_KILLED"
CALLBACK = f"{__name__}.KillFirstWorkerAtStart"
CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "four, forty two"}]


class KillFirstWorkerAtStart(WorkerGroupCallback):
    """SIGKILLs rank 0's worker process before its train context exists, on the first start only."""

    def __init__(self):
        self.record = os.environ[KILLED_ENV]  # read in the driver; the instance travels to the controller
        self.done = False

    def before_init_train_context(self, workers):
        if not self.done:
            self.done = True
            pid = workers[0].metadata.pid
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).wait(timeout=30)
            Path(self.record).write_text(str(pid))
        return {}


@pytest.fixture
def killing(monkeypatch, tmp_path):
    record = tmp_path / "killed.txt"
    monkeypatch.setenv(KILLED_ENV, str(record))
    monkeypatch.setenv("RAY_TRAIN_CALLBACKS", CALLBACK)
    return record


def _train(tmp_path, tiny_model, max_failures: int):
    data = tmp_path / "rows.parquet"
    write_rows([{"messages": CHAT}] * 4, data)
    cfg = tiny_train_config(epochs=1, max_failures=max_failures)
    return train_lora(cfg, tiny_model, str(data), str(tmp_path / "adapter"), str(tmp_path / "ray_train"),
                      name=f"start-kill-{max_failures}")


def test_a_worker_killed_while_starting_is_retried_and_trains(ray_session, tiny_model, tmp_path, killing):
    result = _train(tmp_path, tiny_model, max_failures=1)
    assert killing.is_file(), "the callback never ran: the start failure was not injected"
    assert not psutil.pid_exists(int(killing.read_text()))
    assert lora_b_moved(result.adapter_path) and result.metrics["epoch"] == 1


def test_without_a_retry_left_the_start_failure_is_raised(ray_session, tiny_model, tmp_path, killing):
    with pytest.raises(ControllerError, match="failed to initialize"):
        _train(tmp_path, tiny_model, max_failures=0)
    assert killing.is_file() and not (tmp_path / "adapter").exists()
