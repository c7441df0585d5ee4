"""Pool lifecycle, routing, adapters and replica loss on real Ray actors with a scripted engine."""

import json
import threading
import time

import pytest
import ray
from ray.util.state import list_actors, list_placement_groups

from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
from actors.router import wait_healthy
from actors.errors import AdapterError, ContextLengthError, UnknownModelError
from actors.scripted import scripted_factory
from actors.types import GenerateRequest


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


def _pool(model_dir, name, n=2, **replica):
    cfg = PoolConfig(replica=ReplicaConfig(model=model_dir, model_id="base", num_cpus=0.5, **replica),
                     num_replicas=n, name=name)
    return ReplicaPool(cfg, engine_factory=scripted_factory)


def _adapter(tmp_path, name, rank=8):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (d / "adapter_model.safetensors").write_bytes(b"")
    return str(d)


def _alive(kind, pool_name):
    if kind == "actors":
        return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if pool_name in (a.name or "")]
    return [p for p in list_placement_groups() if p.state == "CREATED"]


def test_launch_is_idempotent_and_kill_leaves_nothing(ray_local, model_dir):
    pool = _pool(model_dir, "life")
    pool.launch()
    first = {h["pid"] for h in pool.health()}
    pool.launch()  # second launch starts nothing
    assert {h["pid"] for h in pool.health()} == first and len(first) == 2
    assert len(_alive("actors", "life")) == 3  # 2 replicas + state actor
    pool.kill()
    pool.kill()  # idempotent
    assert _alive("actors", "life") == [] and _alive("pgs", "life") == []


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
        with pytest.raises(AdapterError, match="already serves"):
            pool.load_adapter("base:ft-01", _adapter(tmp_path, "v2"))
        out = pool.router.map([GenerateRequest("base:ft-01", prompt="x") for _ in range(8)])
        assert {c.text for c in out} == {"ok@base:ft-01"} and {c.replica for c in out} == {0, 1}
        # a crashed replica is restarted by Ray and reloads the pool's adapters from its state
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


def test_replica_killed_mid_batch_loses_no_request(ray_local, model_dir):
    with _pool(model_dir, "fault").launch() as pool:
        victim = pool._replicas[1][0]
        threading.Timer(0.05, lambda: ray.kill(victim, no_restart=False)).start()
        out = pool.router.map([GenerateRequest("base", prompt=f"q {i}") for i in range(64)])
        assert len(out) == 64 and all(c.text == "ok" for c in out)


def test_scale_up_and_down(ray_local, model_dir, tmp_path):
    with _pool(model_dir, "scale", n=1).launch() as pool:
        pool.load_adapter("a1", _adapter(tmp_path, "a1"))
        pool.scale(3)
        assert sorted(h["rank"] for h in pool.health()) == [0, 1, 2]
        assert all(h["adapters"] == ["a1"] for h in pool.health())  # new replicas got the adapter
        pool.scale(1)
        assert [h["rank"] for h in pool.health()] == [0]
        assert len(_alive("actors", "scale")) == 2
        time.sleep(0)  # requests after scaling still answered
        assert pool.router.submit(GenerateRequest("base", prompt="x")).replica == 0


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
