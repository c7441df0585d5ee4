"""The engine watchdog of ``actors.inference.watchdog``: a process started by ``multiprocessing`` (as vLLM
starts its EngineCore) exits, with its own children, once the process that started it is killed.

No vLLM here: a stand-in "replica" script spawns a stand-in "engine" that starts the watchdog
the way the plugin does in vLLM's EngineCore, plus a grandchild; the test SIGKILLs the replica.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from actors.inference import watchdog as engine_watchdog

REPLICA = '''
import multiprocessing, os, subprocess, sys, time

def engine(ready):
    from actors.inference.watchdog import start_watchdog
    started = start_watchdog(poll_s=0.1)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    ready.send((os.getpid(), grandchild.pid, started))
    time.sleep(600)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    ctx.Process(target=engine, args=(send,)).start()
    print(*receive.recv(), flush=True)
    time.sleep(600)
'''


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_replica(tmp_path, watchdog: str | None):
    script = tmp_path / "replica.py"
    script.write_text(REPLICA)
    env = {k: v for k, v in os.environ.items() if k != engine_watchdog.WATCHDOG_ENV}
    if watchdog is not None:
        env[engine_watchdog.WATCHDOG_ENV] = watchdog
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    replica = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    engine, grandchild, started = replica.stdout.readline().split()
    return replica, int(engine), int(grandchild), started == "True"


def _kill_all(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_engine_exits_with_its_children_when_its_replica_is_killed(tmp_path):
    replica, engine, grandchild, started = _start_replica(tmp_path, "1")
    try:
        assert started and _running(engine) and _running(grandchild)
        replica.kill()
        replica.wait()
        deadline = time.monotonic() + 10
        while _running(engine) or _running(grandchild):
            assert time.monotonic() < deadline, "the engine outlived its replica by 10 s"
            time.sleep(0.05)
    finally:
        _kill_all(replica.pid, engine, grandchild)


def test_without_the_switch_no_watchdog_runs(tmp_path):
    replica, engine, grandchild, started = _start_replica(tmp_path, None)
    try:
        assert not started
        replica.kill()
        replica.wait()
        time.sleep(1.0)  # ten polling periods of a watchdog, had one been started
        assert _running(engine)  # the orphan the watchdog exists for
    finally:
        _kill_all(engine, grandchild)


def test_no_watchdog_in_a_process_not_started_by_multiprocessing(monkeypatch):
    monkeypatch.setenv(engine_watchdog.WATCHDOG_ENV, "1")
    assert multiprocessing.parent_process() is None  # like a Ray worker: the replica itself
    assert engine_watchdog.start_watchdog() is False


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
