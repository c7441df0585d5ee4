"""One writer per run dir: a second run is refused naming the holder, a dead holder's lock is taken
over, a lock from another host is kept, and ``tandem run`` on a held run dir writes nothing."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from engine.store.lock import LOCK, RunDirBusy, hold, holder_of


def _lock(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                            "started": time.time(), "token": "theirs", **holder}))


def test_a_second_run_is_refused_naming_the_holder_and_the_lock_goes_with_the_first(tmp_path):
    with hold(tmp_path / "run") as me:
        assert holder_of(tmp_path / "run") == me
        with pytest.raises(RunDirBusy, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}"):
            with hold(tmp_path / "run"):
                pass
        assert holder_of(tmp_path / "run") == me  # the refused one took nothing away
    assert not (tmp_path / "run" / LOCK).exists()


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock(tmp_path, pid=int(gone.stdout))  # that process has exited
    with hold(tmp_path) as me:
        assert holder_of(tmp_path)["token"] == me["token"]
    assert "took over the lock of a run that is gone" in caplog.text
    _lock(tmp_path, started=time.time() - 3600, pid=os.getpid() + 10**6)  # no such pid
    with hold(tmp_path):
        pass
    _lock(tmp_path, started=0.0)  # our pid, but this process started after the lock: a reused pid
    with hold(tmp_path):
        pass


def test_a_lock_from_another_host_or_a_live_process_is_kept(tmp_path):
    _lock(tmp_path, host="other-node", pid=1)
    with pytest.raises(RunDirBusy, match=f"delete {tmp_path / LOCK}"):
        with hold(tmp_path):
            pass
    assert holder_of(tmp_path)["host"] == "other-node"
    _lock(tmp_path, pid=os.getppid(), started=0.0 + time.time())  # our parent: alive, started before the lock
    with pytest.raises(RunDirBusy):
        with hold(tmp_path):
            pass


def test_tandem_run_on_a_held_run_dir_exits_1_and_writes_nothing(tmp_path, caplog):
    from engine.cli import main

    _lock(tmp_path / "run", host="other-node", pid=1)
    assert main(["run", "--run-dir", str(tmp_path / "run"), "--no-tracking"]) == 1
    assert "is in use by another run (pid 1 on other-node" in caplog.text
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK]  # no run.json, no step, not even a log


def test_a_stopped_run_is_tracked_and_gives_its_run_dir_back(tmp_path, monkeypatch):
    """Stopped (SIGINT, SIGTERM) is a KeyboardInterrupt: the run used to catch only Exception, so a
    stopped run was never logged to MLflow, though the README says it is."""
    import signal

    import engine.run
    from actors.runtime import Stopped
    from engine.config import RunConfig

    def stopped(cfg):
        assert holder_of(cfg.run_dir)["pid"] == os.getpid()  # held while the run runs
        raise Stopped(signal.SIGTERM)

    tracked = []
    monkeypatch.setattr(engine.run, "_run", stopped)
    monkeypatch.setattr(engine.run, "track_run_or_warn", lambda cfg: tracked.append(cfg.run_dir))
    with pytest.raises(Stopped):
        engine.run.run(RunConfig(run_dir=str(tmp_path / "run")))
    assert tracked == [str(tmp_path / "run")] and holder_of(tmp_path / "run") is None
