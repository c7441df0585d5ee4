"""Pool lifecycle on real vLLM: kill leaves nothing behind; relaunch serves a new adapter.

Runs in its own module so that the other modules' pools are gone and the cores are free.
"""

import psutil
import pytest
from ray.util.state import list_actors, list_placement_groups

from actors import GenerateRequest, PoolConfig, ReplicaConfig, ReplicaPool
from actors.types import Adapter
from tests.integration.conftest import make_adapter

pytestmark = pytest.mark.integration


def _engine_pids(pid):
    return {c.pid for c in psutil.Process(pid).children(recursive=True)}


def _alive_actors(name):
    return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if name in (a.name or "")]


def _created_pgs():
    return {p.placement_group_id for p in list_placement_groups() if p.state == "CREATED"}


def test_kill_leaves_no_actor_placement_group_or_process(ray_session, tiny_model):
    cfg = PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=128, enable_lora=False),
                     num_replicas=2, name="short-lived")
    pgs_before = _created_pgs()
    pool = ReplicaPool(cfg).launch()
    pids = set().union(*(_engine_pids(h["pid"]) | {h["pid"]} for h in pool.health()))
    assert len(_alive_actors("short-lived")) == 3 and len(_created_pgs() - pgs_before) == 2
    pool.kill()
    assert _alive_actors("short-lived") == []
    assert _created_pgs() == pgs_before
    psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
    assert not [p for p in pids if psutil.pid_exists(p)]


def test_too_large_replica_fails_fast_with_the_reason(ray_session, tiny_model):
    cfg = PoolConfig(replica=ReplicaConfig(model="tiny-llama", num_cpus=64), num_replicas=1, name="huge")
    with pytest.raises(ValueError, match="1 replica\\(s\\) x 64 CPU need 64 CPU but the whole cluster has 2"):
        ReplicaPool(cfg).launch()
    assert _alive_actors("huge") == []
    pair = PoolConfig(replica=ReplicaConfig(model="tiny-llama", num_cpus=2), num_replicas=2, name="pair")
    with pytest.raises(ValueError, match="2 replica\\(s\\) x 2 CPU need 4 CPU"):  # each fits, both do not
        ReplicaPool(pair).launch()
    assert _alive_actors("pair") == []


def test_relaunch_serves_the_new_adapter_on_fresh_replicas(ray_session, tiny_model, tmp_path):
    cfg = PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=128, max_lora_rank=8),
                     num_replicas=1, name="relaunch")
    with ReplicaPool(cfg).launch() as pool:
        before = pool.health()[0]["pid"]
        pool.relaunch(Adapter("tiny-llama:ft-01", make_adapter(tiny_model, tmp_path / "a")))
        after = pool.health()
        assert after[0]["pid"] != before and after[0]["adapters"] == ["tiny-llama:ft-01"]
        out = pool.router.submit(GenerateRequest("tiny-llama:ft-01", prompt="Hello", max_tokens=4))
        assert out.completion_tokens > 0
