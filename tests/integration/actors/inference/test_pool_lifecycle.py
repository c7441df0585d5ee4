"""Pool lifecycle on real vLLM: relaunch serves a new adapter on fresh replicas; kill leaves nothing behind.

Runs in its own module so that the other modules' pools are gone and the cores are free.
"""

import psutil
import pytest

from actors import GenerateRequest, PoolConfig, ReplicaConfig, ReplicaPool
from actors.types import Adapter
from tests.integration.conftest import make_adapter
from tests.ray_state import alive_actors, created_placement_groups

pytestmark = pytest.mark.integration


def _engine_pids(pid):
    return {c.pid for c in psutil.Process(pid).children(recursive=True)}


def _created_pgs():
    return {p.placement_group_id for p in created_placement_groups()}


def test_too_large_replica_fails_fast_with_the_reason(ray_session, tiny_model):
    cfg = PoolConfig(replica=ReplicaConfig(model="tiny-llama", num_cpus=64), num_replicas=1, name="huge")
    with pytest.raises(ValueError, match="1 replica\\(s\\) x 64 CPU need 64 CPU but the whole cluster has 2"):
        ReplicaPool(cfg).launch()
    assert alive_actors("huge") == []
    pair = PoolConfig(replica=ReplicaConfig(model="tiny-llama", num_cpus=2), num_replicas=2, name="pair")
    with pytest.raises(ValueError, match="2 replica\\(s\\) x 2 CPU need 4 CPU"):  # each fits, both do not
        ReplicaPool(pair).launch()
    assert alive_actors("pair") == []


def test_relaunch_serves_the_new_adapter_on_fresh_replicas_and_kill_leaves_nothing(ray_session, tiny_model,
                                                                                   tmp_path):
    cfg = PoolConfig(replica=ReplicaConfig(model="tiny-llama", max_model_len=128, max_lora_rank=8),
                     num_replicas=2, name="relaunch")
    pgs_before = _created_pgs()
    pool = ReplicaPool(cfg).launch()
    before = {h["pid"] for h in pool.health()}
    pids = set().union(*(_engine_pids(pid) | {pid} for pid in before))
    assert len(alive_actors("relaunch")) == 3 and len(_created_pgs() - pgs_before) == 2  # router + 2 replicas
    pool.relaunch(Adapter("tiny-llama:ft-01", make_adapter(tiny_model, tmp_path / "a")))
    after = pool.health()
    assert not before & {h["pid"] for h in after} and all(h["adapters"] == ["tiny-llama:ft-01"] for h in after)
    out = pool.router.submit(GenerateRequest("tiny-llama:ft-01", prompt="Hello", max_tokens=4))
    assert out.completion_tokens > 0
    pids |= set().union(*(_engine_pids(h["pid"]) | {h["pid"]} for h in after))

    pool.kill()  # no actor, placement group or process of either generation is left
    assert alive_actors("relaunch") == []
    assert _created_pgs() == pgs_before
    psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
    assert not [p for p in pids if psutil.pid_exists(p)]
