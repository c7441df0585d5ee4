"""Pool lifecycle, routing, adapters, replica loss, engine death, request timeouts and failed
launches on real Ray actors with scripted engines."""

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group

from actors import LMReplica, PoolConfig, ReplicaConfig, ReplicaPool, connect, runtime
from actors.inference.router import wait_healthy
from actors.errors import (AdapterError, ContextLengthError, EngineDeadError, PoolUnavailableError,
                           UnknownModelError)
from actors.inference.scripted import ScriptedEngine, scripted_factory
from actors.types import GenerateRequest
from tests.ray_state import alive_actors, created_placement_groups
from tests.unit.actors.inference import faulty_engines as faulty


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "config.json").write_text("{}")
    return str(d)


@pytest.fixture(scope="module")
def ray_local():
    connect(num_cpus=2)
    yield
    ray.shutdown()


def _pool(model_dir, name, n=2, factory=scripted_factory, pool=None, **replica):
    replica = {"num_cpus": 0.5, **replica}
    cfg = PoolConfig(replica=ReplicaConfig(model=model_dir, model_id="base", **replica),
                     num_replicas=n, name=name, **(pool or {}))
    return ReplicaPool(cfg, engine_factory=factory)


def _adapter(tmp_path, name, rank=8):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (d / "adapter_model.safetensors").write_bytes(b"")
    return str(d)


def _alive(kind, pool_name):
    return alive_actors(pool_name) if kind == "actors" else created_placement_groups()


def _created_pgs():
    return {p.placement_group_id for p in created_placement_groups()}


def _assert_nothing_left(pool_name, pgs_before, timeout_s=15.0):
    """No actor of the pool (replicas, state actor) and no new placement group; ray.kill is asynchronous."""
    deadline = time.monotonic() + timeout_s
    while True:
        actors, pgs = _alive("actors", pool_name), _created_pgs() - pgs_before
        if not actors and not pgs:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"pool {pool_name!r} left behind actors {[a.name for a in actors]} and placement groups {pgs}")
        time.sleep(0.2)


def _restarted(handle, old_pid, timeout_s=60.0):
    """The replica's health record once it answers from a process other than ``old_pid``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            health = wait_healthy(handle, timeout_s=timeout_s)
        except RayActorError:  # the call met the old process as it exited
            health = {"pid": old_pid}
        if health["pid"] != old_pid:
            return health
        assert time.monotonic() < deadline, f"replica still runs in pid {old_pid} after {timeout_s:.0f}s"
        time.sleep(0.2)


def _when_busy(handle, action):
    """A thread that runs ``action()`` once ``handle`` has requests in flight; returns (thread, record)."""
    record = {}

    def run():
        deadline = time.monotonic() + 30
        while ray.get(handle.stats.remote())["inflight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        record["inflight"] = ray.get(handle.stats.remote())["inflight"]
        record["result"] = action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, record


def test_two_runs_on_one_cluster_keep_their_own_pools(ray_local, model_dir):
    """Every run took the pool name "run" and joined an existing state actor of that name: a second
    run shared the first's replica list, and killing one killed the other's. Now each run's pool name
    carries its run dir and a random tag."""
    from engine.run import pool_name

    names = pool_name("run", "runs/iris-smollm2"), pool_name("run", "/data/runs/iris-smollm2")
    assert names[0] != names[1] and all(n.startswith("run-iris-smollm2-") for n in names)
    first, second = (_pool(model_dir, name, n=1) for name in names)
    with first.launch(), second.launch():
        assert first.router.submit(GenerateRequest("base", prompt="a")).text
        theirs = {h["pid"] for h in second.health()}
        assert {h["pid"] for h in first.health()}.isdisjoint(theirs)
        first.kill()  # one run ends (or fails): the other's pool is untouched
        assert {h["pid"] for h in second.health()} == theirs
        assert second.router.submit(GenerateRequest("base", prompt="b")).text


def test_launch_is_idempotent_and_kill_leaves_nothing(ray_local, model_dir):
    pool = _pool(model_dir, "life")
    began = time.monotonic()
    pool.launch()
    first = {h["pid"] for h in pool.health()}
    pool.launch()  # second launch starts nothing
    assert {h["pid"] for h in pool.health()} == first and len(first) == 2
    assert len(_alive("actors", "life")) == 3  # 2 replicas + state actor
    assert pool.live_replicas() == 2
    ray.kill(pool._replicas[1][0], no_restart=True)  # gone for good, as after its last restart
    assert pool.live_replicas() == 1
    time.sleep(0.5)
    pool.kill()
    up = time.monotonic() - began
    pool.kill()  # idempotent
    assert _alive("actors", "life") == [] and _alive("pgs", "life") == []
    assert pool.live_replicas() == 0
    assert 2 * 0.5 <= pool.replica_seconds() <= 2 * up  # both replicas, from their start until the kill
    time.sleep(0.2)
    assert pool.replica_seconds() <= 2 * up  # stopped replicas cost nothing more


def test_concurrent_requests_spread_over_replicas(ray_local, model_dir):
    with _pool(model_dir, "spread").launch() as pool:
        out = pool.router.map([GenerateRequest("base", prompt=f"q {i}") for i in range(40)])
        assert [c.text for c in out] == ["ok"] * 40
        served = [s["requests"] for s in pool.stats()]
        assert sum(served) == 40 and min(served) >= 10


def test_bad_requests_fail_clearly_and_pool_keeps_serving(ray_local, model_dir, tmp_path):
    with _pool(model_dir, "bad").launch() as pool:
        with pytest.raises(UnknownModelError, match="'nope' is not served"):
            pool.router.submit(GenerateRequest("nope", prompt="x"))
        with pytest.raises(ContextLengthError, match="prompt is 70 tokens"):
            pool.router.submit(GenerateRequest("base", prompt="w " * 70))
        with pytest.raises(AdapterError, match="rank 64, above this pool's max_lora_rank=32"):
            pool.load_adapter("big", _adapter(tmp_path, "big", rank=64))
        with pytest.raises(AdapterError, match="no adapter_config.json"):
            pool.load_adapter("gone", str(tmp_path / "gone"))
        assert pool.adapters() == []
        assert pool.router.submit(GenerateRequest("base", prompt="still there")).text == "ok"


def test_adapters_load_everywhere_and_survive_restart(ray_local, model_dir, tmp_path):
    with _pool(model_dir, "lora").launch() as pool:
        path = _adapter(tmp_path, "v1")
        pool.load_adapter("base:ft-01", path)
        pool.load_adapter("base:ft-01", path)  # same name and path: no-op
        twin = pool.load_adapter("base:ft-01", _adapter(tmp_path, "twin"))  # the same files elsewhere: that adapter
        assert twin.path == str((tmp_path / "v1").resolve()) and pool.adapters() == ["base:ft-01"]
        with pytest.raises(AdapterError, match="already serves"):
            pool.load_adapter("base:ft-01", _adapter(tmp_path, "v2", rank=4))  # other files under the name
        out = pool.router.map([GenerateRequest("base:ft-01", prompt="x") for _ in range(8)])
        assert {c.text for c in out} == {"ok@base:ft-01"} and {c.replica for c in out} == {0, 1}
        # a crashed replica is restarted by Ray and reloads the pool's adapters from its state: from the
        # files the pool shipped, not from the driver's path (gone now, as on a node that never saw it)
        shutil.rmtree(path)
        victim = pool._replicas[0][0]
        old_pid = wait_healthy(victim)["pid"]
        ray.kill(victim, no_restart=False)
        health = wait_healthy(victim, timeout_s=60)
        while health["pid"] == old_pid:  # ray.kill is asynchronous: the old process may answer first
            time.sleep(0.2)
            health = wait_healthy(victim, timeout_s=60)
        assert health["adapters"] == ["base:ft-01"]
        pool.unload_adapter("base:ft-01")
        with pytest.raises(UnknownModelError):
            pool.router.submit(GenerateRequest("base:ft-01", prompt="x"))


class SlowLoad(ScriptedEngine):
    """Takes a second to load an adapter and writes when that began and ended into the model dir."""

    def __init__(self, cfg, model_path):
        super().__init__(cfg, model_path)
        self.model_path = model_path

    async def add_adapter(self, adapter):
        import os

        began = time.time()
        await asyncio.sleep(1.0)
        await super().add_adapter(adapter)
        with open(f"{self.model_path}/load-{adapter.name}-{os.getpid()}.json", "w") as f:
            json.dump([began, time.time()], f)


def test_an_adapter_is_loaded_into_every_replica_at_once(ray_local, model_dir, tmp_path):
    """Loads overlap: one replica after the other, a GRPO sync on 64 replicas took 64 loads' time."""
    from pathlib import Path

    with _pool(model_dir, "at-once", n=4, factory=SlowLoad, num_cpus=0.25).launch() as pool:
        pool.load_adapter("base:ft-09", _adapter(tmp_path, "v9"))
        spans = [json.loads(f.read_text()) for f in Path(model_dir).glob("load-base:ft-09-*.json")]
        assert len(spans) == 4
        assert max(began for began, _ in spans) < min(ended for _, ended in spans)  # all four were loading at once


def slow_engine(cfg, model_path):
    """The scripted engine, half a second per request: a kill can land while requests are in flight."""
    return ScriptedEngine(cfg, model_path, delay_s=0.5)


def test_replica_killed_mid_batch_loses_no_request(ray_local, model_dir):
    with _pool(model_dir, "fault", factory=slow_engine).launch() as pool:
        victim = pool._replicas[1][0]
        killed = {}

        def kill_when_busy():
            deadline = time.monotonic() + 30
            while (inflight := ray.get(victim.stats.remote())["inflight"]) == 0 and time.monotonic() < deadline:
                pass
            killed["inflight"] = inflight
            ray.kill(victim, no_restart=False)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        out = pool.router.map([GenerateRequest("base", prompt=f"q {i}") for i in range(64)])
        killer.join()
        assert killed["inflight"] > 0  # the replica died with requests in flight
        assert len(out) == 64 and all(c.text == "ok" for c in out)


def test_scale_up_and_down(ray_local, model_dir, tmp_path):
    with _pool(model_dir, "scale", n=1).launch() as pool:
        pool.load_adapter("a1", _adapter(tmp_path, "a1"))
        pool.scale(3)
        assert sorted(h["rank"] for h in pool.health()) == [0, 1, 2]
        assert all(h["adapters"] == ["a1"] for h in pool.health())  # new replicas got the adapter
        grown = pool.replica_seconds()
        pool.scale(1)
        shrunk = pool.replica_seconds()
        time.sleep(0.3)
        assert pool.replica_seconds() - shrunk == pytest.approx(0.3, abs=0.1)  # one replica left running
        assert shrunk >= grown
        assert [h["rank"] for h in pool.health()] == [0]
        assert len(_alive("actors", "scale")) == 2
        assert pool.router.submit(GenerateRequest("base", prompt="x")).replica == 0  # still answered after scaling


def test_router_pickled_elsewhere_finds_the_pool(ray_local, model_dir):
    with _pool(model_dir, "remote").launch() as pool:
        router = pool.router

        @ray.remote(num_cpus=0)
        def ask(r):
            return r.submit(GenerateRequest("base", prompt="from a worker")).text

        assert ray.get(ask.remote(router)) == "ok"


def test_routers_made_before_a_relaunch_reach_the_new_replicas(ray_local, model_dir):
    with _pool(model_dir, "again").launch() as pool:
        old_router = pool.router  # e.g. held by a dspy.LM made before fine-tuning
        old_pids = {h["pid"] for h in pool.health()}
        pool.relaunch()
        assert {h["pid"] for h in pool.health()}.isdisjoint(old_pids)
        out = [old_router.submit(GenerateRequest("base", prompt=f"q {i}")) for i in range(6)]
        assert all(c.text == "ok" for c in out)


# -- a dead engine ends its replica's process; Ray restarts it --------------------------------


def test_engine_dying_mid_batch_restarts_its_replica_and_loses_no_request(ray_local, model_dir):
    with _pool(model_dir, "enginedeath", factory=faulty.dying_factory).launch() as pool:
        victim = pool._replicas[1][0]
        old_pid = wait_healthy(victim)["pid"]
        killer, killed = _when_busy(victim, lambda: victim.generate.remote(GenerateRequest("base", prompt=faulty.DIE)))
        out = pool.router.map([GenerateRequest("base", prompt=f"q {i}") for i in range(64)])
        killer.join()
        assert killed["inflight"] > 0
        assert [c.text for c in out] == ["ok"] * 64
        with pytest.raises(RayActorError):  # the request that met the dead engine: a lost replica, not an error
            ray.get(killed["result"])
        assert _restarted(victim, old_pid)["rank"] == 1
        assert ray.get(victim.generate.remote(GenerateRequest("base", prompt="after"))).text == "ok"


def test_single_replica_pool_waits_for_the_restart_instead_of_failing(ray_local, model_dir):
    # one re-send only, and it can only go to the replica that is restarting: the router waits for it
    with _pool(model_dir, "lonely", n=1, factory=faulty.dying_factory, pool={"request_retries": 1}).launch() as pool:
        victim = pool._replicas[0][0]
        old_pid = wait_healthy(victim)["pid"]
        killer, killed = _when_busy(victim, lambda: victim.generate.remote(GenerateRequest("base", prompt=faulty.DIE)))
        out = pool.router.map([GenerateRequest("base", prompt=f"q {i}") for i in range(16)])
        killer.join()
        assert killed["inflight"] > 0 and [c.text for c in out] == ["ok"] * 16
        assert _restarted(victim, old_pid)["rank"] == 0


def test_engine_found_dead_between_calls_restarts_its_replica(ray_local, model_dir):
    with _pool(model_dir, "quietdeath", n=1, factory=faulty.dying_factory).launch() as pool:
        victim = pool._replicas[0][0]
        old_pid = wait_healthy(victim)["pid"]
        assert ray.get(victim.generate.remote(GenerateRequest("base", prompt=faulty.DIE_QUIETLY))).text == "dying"
        _restarted(victim, old_pid, timeout_s=30)  # the replica's engine check (every 1 s) or health() saw it
        assert pool.router.submit(GenerateRequest("base", prompt="x")).text == "ok"


def test_engine_shut_down_on_purpose_fails_calls_in_flight_without_a_restart(ray_local, model_dir):
    with _pool(model_dir, "onpurpose", n=1, factory=faulty.dying_factory).launch() as pool:
        victim = pool._replicas[0][0]
        pid = wait_healthy(victim)["pid"]
        refs = [victim.generate.remote(GenerateRequest("base", prompt=f"q {i}")) for i in range(4)]
        stopper, _ = _when_busy(victim, lambda: ray.get(victim.shutdown.remote()))
        stopper.join()
        for ref in refs:
            with pytest.raises(EngineDeadError, match="the engine was shut down"):
                ray.get(ref)
        assert wait_healthy(victim)["pid"] == pid  # same process, a new engine


def test_outside_ray_a_dead_engine_raises_and_the_next_call_builds_a_new_one(model_dir):
    replica = LMReplica(ReplicaConfig(model=model_dir, model_id="base"), 0, engine_factory=faulty.dying_factory)

    async def run():
        with pytest.raises(EngineDeadError, match="scripted engine died"):
            await replica.generate(GenerateRequest("base", prompt=faulty.DIE))
        assert (await replica.generate(GenerateRequest("base", prompt="x"))).text == "ok"
        await replica.generate(GenerateRequest("base", prompt=faulty.DIE_QUIETLY))
        with pytest.raises(EngineDeadError, match="found dead by health"):
            await replica.health()
        assert (await replica.health())["rank"] == 0  # a new engine
        replica.shutdown()

    asyncio.run(run())


# -- request timeouts ------------------------------------------------------------------------


def test_request_timeout_resends_to_another_replica_and_cancels_the_slow_one(ray_local, model_dir):
    pool_cfg = {"request_timeout_s": 1.0}
    with _pool(model_dir, "slowone", factory=faulty.slow_on_rank0_factory, pool=pool_cfg).launch() as pool:
        started = time.monotonic()
        out = pool.router.map([GenerateRequest("base", prompt=f"q {i}") for i in range(4)])
        assert [c.text for c in out] == ["ok"] * 4 and {c.replica for c in out} == {1}
        assert time.monotonic() - started < faulty.SLOW_S / 2
        slow = pool._replicas[0][0]
        deadline = time.monotonic() + 10
        while ray.get(slow.stats.remote())["inflight"]:  # the timed-out attempts were cancelled there
            assert time.monotonic() < deadline, "timed-out requests still run on the slow replica"
            time.sleep(0.1)


def test_request_out_of_time_everywhere_fails_naming_the_timeout(ray_local, model_dir):
    pool_cfg = {"request_timeout_s": 0.5, "request_retries": 1}
    with _pool(model_dir, "allslow", factory=faulty.slow_factory, pool=pool_cfg).launch() as pool:
        started = time.monotonic()
        timed_out = r"after 1 re-sends: .*no answer within the request timeout of 0.5s"
        with pytest.raises(PoolUnavailableError, match=timed_out):
            pool.router.submit(GenerateRequest("base", prompt="x"))
        with pytest.raises(PoolUnavailableError, match="request timeout of 0.5s"):
            pool.router.map([GenerateRequest("base", prompt="y")])
        assert time.monotonic() - started < faulty.SLOW_S / 2


# -- engine aborts -------------------------------------------------------------------------


def test_an_engine_abort_is_an_error_resent_elsewhere_never_an_answer(ray_local, model_dir):
    with _pool(model_dir, "aborts", factory=faulty.aborting_on_rank0_factory).launch() as pool:
        out = pool.router.map([GenerateRequest("base", prompt=f"q {i}") for i in range(4)])
        assert [c.text for c in out] == ["ok"] * 4 and {c.replica for c in out} == {1}
    with _pool(model_dir, "abortsonly", n=1, factory=faulty.aborting_on_rank0_factory,
               pool={"request_retries": 1}).launch() as pool:
        with pytest.raises(PoolUnavailableError, match="EngineAbortedError: .*finish reason 'abort'"):
            pool.router.submit(GenerateRequest("base", prompt="x"))


# -- a launch that fails half-way leaves nothing behind -------------------------------------


def test_launch_failing_on_one_replica_stops_everything_it_started(ray_local, model_dir):
    pgs_before = _created_pgs()
    pool = _pool(model_dir, "halfway", factory=faulty.fails_on_rank1_factory)
    with pytest.raises(RuntimeError, match="cannot start on rank 1"):
        pool.launch()
    assert not pool.launched
    _assert_nothing_left("halfway", pgs_before)


def test_placement_timeout_after_one_replica_started_stops_everything(ray_local, model_dir):
    total = ray.cluster_resources()["CPU"]
    blocker = placement_group([{"CPU": total - 0.5}])  # room for one replica of 0.5 CPU, not two
    ray.get(blocker.ready(), timeout=30)
    try:
        pgs_before = _created_pgs()
        pool = _pool(model_dir, "nofit", pool={"start_timeout_s": 2.0})
        with pytest.raises(TimeoutError, match="replica 1 of pool 'nofit' .* could not place it within 2s"):
            pool.launch()
        _assert_nothing_left("nofit", pgs_before)
    finally:
        remove_placement_group(blocker)


def test_pool_too_large_for_the_cluster_creates_nothing(ray_local, model_dir):
    pgs_before = _created_pgs()
    with pytest.raises(ValueError, match="whole cluster has 2"):
        _pool(model_dir, "toolarge", n=1, num_cpus=4).launch()
    _assert_nothing_left("toolarge", pgs_before, timeout_s=0)


def test_the_fit_check_counts_what_an_autoscaler_may_add(ray_local, monkeypatch):
    from ray._private.state import state

    from actors.inference.pool import _check_fits

    gpu_replicas = [{"CPU": 1.0, "GPU": 1.0}]
    with pytest.raises(ValueError, match="need 2 GPU but the whole cluster has 0"):
        _check_fits(gpu_replicas, 2)  # a fixed cluster without GPUs: refused at once
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 64, "GPU": 8})
    _check_fits(gpu_replicas, 2)  # an autoscaling cluster that may grow to 8 GPUs: launched, and waited for


def test_calls_in_flight_when_a_stopped_run_kills_its_pool_fail_at_once_without_resends(ray_local, model_dir, caplog,
                                                                                           monkeypatch):
    # SIGTERM / Ctrl-C: the run kills its pool under calls still in flight; they must end, not re-send
    pool = _pool(model_dir, "stopping", n=2, factory=faulty.slow_factory).launch()
    with ThreadPoolExecutor(4) as threads:
        calls = [threads.submit(pool.router.submit, GenerateRequest("base", prompt=f"q {i}")) for i in range(4)]
        deadline = time.monotonic() + 30
        while sum(s["inflight"] for s in pool.stats()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.setattr(runtime._stopping, "is_set", lambda: True)  # as the signal handler sets it
        pool.kill()
        for call in calls:
            with pytest.raises(PoolUnavailableError, match="is stopping"):
                call.result(timeout=30)
    assert "re-sending elsewhere" not in caplog.text
