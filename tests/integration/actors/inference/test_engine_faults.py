"""A replica and its vLLM engine die together, and the pool answers every request around the death.

Two faults on a pool of 2 tiny vLLM-CPU replicas: the replica's worker process SIGKILLed (its
EngineCore must exit within seconds, not linger as an orphan holding gigabytes), and the
EngineCore SIGKILLed under a live replica (the replica must exit so that Ray restarts it, since
vLLM raises ``EngineDeadError`` on every call after its EngineCore died). In both, requests in
flight at the kill are re-sent to the other replica and Ray brings the victim back.
"""

import os
import signal
import threading
import time

import psutil
import pytest
import ray

from actors import GenerateRequest, PoolConfig, ReplicaConfig, ReplicaPool
from actors.inference.router import wait_healthy

pytestmark = pytest.mark.integration
MODEL_ID = "tiny-llama"


@pytest.fixture(scope="module")
def pool(ray_session, tiny_model):
    cfg = PoolConfig(replica=ReplicaConfig(model=MODEL_ID, max_model_len=128, enable_lora=False),
                     num_replicas=2, name="faults")
    pool = ReplicaPool(cfg).launch()
    yield pool
    pool.kill()


def _engine_tree(replica_pid: int) -> tuple[int, set[int]]:
    """The replica's EngineCore pid and every process below the replica."""
    children = psutil.Process(replica_pid).children(recursive=True)
    cores = [c.pid for c in children if "EngineCore" in " ".join(c.cmdline())]
    assert len(cores) == 1, f"expected one EngineCore under replica {replica_pid}, found {cores}"
    return cores[0], {c.pid for c in children}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_exited(pids, timeout_s: float) -> float:
    """Seconds until every pid has exited; fails after ``timeout_s``."""
    started = time.monotonic()
    while alive := [p for p in pids if _running(p)]:
        assert time.monotonic() - started < timeout_s, f"still running after {timeout_s:.0f}s: {alive}"
        time.sleep(0.1)
    return time.monotonic() - started


def _restarted(handle, old_pid: int, timeout_s: float = 120.0) -> dict:
    """The replica's health once it answers from a new process (Ray restarted it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            health = wait_healthy(handle, timeout_s=timeout_s)
        except ray.exceptions.RayActorError:  # the call met the old process on its way out
            health = {"pid": old_pid}
        if health["pid"] != old_pid:
            return health
        assert time.monotonic() < deadline, f"replica still in pid {old_pid} after {timeout_s:.0f}s"
        time.sleep(0.2)


def _both_serve(pool, timeout_s: float = 60.0) -> None:
    """The restarted replica is back in the router's rotation: a batch is served by both replicas."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = pool.router.map(_requests(16, "after"))
        assert all(c.completion_tokens > 0 for c in after)
        if {c.replica for c in after} == {0, 1}:
            return
        assert time.monotonic() < deadline, f"only replicas {sorted({c.replica for c in after})} serve"
        time.sleep(1.0)


def _kill_when_busy(handle, pid: int) -> tuple[threading.Thread, dict]:
    """SIGKILL ``pid`` as soon as the replica behind ``handle`` has requests in flight."""
    record = {}

    def run():
        deadline = time.monotonic() + 60
        while ray.get(handle.stats.remote())["inflight"] == 0:
            assert time.monotonic() < deadline, "no request ever reached the victim"
            time.sleep(0.01)
        record["inflight"] = ray.get(handle.stats.remote())["inflight"]
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, record


def _requests(n: int, tag: str) -> list[GenerateRequest]:
    return [GenerateRequest(MODEL_ID, prompt=f"{tag} {i}", max_tokens=24) for i in range(n)]


def test_replica_process_killed_takes_its_engine_down_and_comes_back(pool):
    victim = pool._replicas[0][0]
    old = wait_healthy(victim)
    core, tree = _engine_tree(old["pid"])
    killer, killed = _kill_when_busy(victim, old["pid"])
    out = pool.router.map(_requests(48, "around the replica kill"))
    killer.join()
    assert killed["inflight"] > 0
    assert len(out) == 48 and all(c.completion_tokens > 0 for c in out)
    assert _wait_exited([core, *tree], timeout_s=15) < 15  # the engine died with its replica
    new = _restarted(victim, old["pid"])
    assert _engine_tree(new["pid"])[0] != core
    _both_serve(pool)


def test_engine_killed_under_a_live_replica_restarts_the_replica(pool):
    victim = pool._replicas[1][0]
    old = wait_healthy(victim)
    core, tree = _engine_tree(old["pid"])
    killer, killed = _kill_when_busy(victim, core)
    out = pool.router.map(_requests(48, "around the engine kill"))
    killer.join()
    assert killed["inflight"] > 0
    assert len(out) == 48 and all(c.completion_tokens > 0 for c in out)
    _wait_exited([old["pid"], *tree], timeout_s=30)  # the replica exited on EngineDeadError
    new = _restarted(victim, old["pid"])
    assert new["rank"] == 1 and _engine_tree(new["pid"])[0] != core
    _both_serve(pool)
