"""Config, request and device rules: bad values are refused with the problem named."""

import pytest

from actors.inference import device
from actors.config import PoolConfig, ReplicaConfig
from actors.errors import LMRequestError
from actors.types import GenerateRequest


def test_replica_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_lora_rank=24"):
        ReplicaConfig(max_lora_rank=24)
    with pytest.raises(ValueError, match="max_model_len"):
        ReplicaConfig(max_model_len=0)
    with pytest.raises(ValueError, match="needs GPUs"):
        ReplicaConfig(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="num_replicas"):
        PoolConfig(num_replicas=0)
    with pytest.raises(ValueError, match="no ':'"):
        PoolConfig(name="a:b")


def test_engine_kwargs_are_copied_not_shared():
    kwargs = {"block_size": 16}
    cfg = ReplicaConfig(engine_kwargs=kwargs)
    kwargs["block_size"] = 32
    assert cfg.engine_kwargs == {"block_size": 16}


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "x", "n": 0}, "n must be an integer >= 1"),
    ({"prompt": "x", "n": 2}, "needs temperature > 0"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": 3.0}, "temperature"),
    ({}, "exactly one of"),
    ({"prompt": "x", "messages": ({"role": "user", "content": "x"},)}, "exactly one of"),
    ({"messages": ()}, "messages is empty"),
    ({"messages": ({"role": "user"},)}, "string 'role' and 'content'"),
])
def test_generate_request_validation(kwargs, message):
    with pytest.raises(LMRequestError, match=message):
        GenerateRequest("m", **kwargs)


def test_sampling_request_with_n_is_valid():
    req = GenerateRequest("m", prompt="x", n=3, temperature=0.7, stop=["\n"])
    assert req.n == 3 and req.stop == ("\n",)


def test_cpu_binding_gives_each_replica_its_own_cores():
    one = ReplicaConfig(num_cpus=1)
    assert [device.cpu_bind(one, r, cores=2) for r in range(3)] == ["0", "1", "0"]
    two = ReplicaConfig(num_cpus=2)
    assert [device.cpu_bind(two, r, cores=4) for r in range(2)] == ["0-1", "2-3"]
    assert device.cpu_bind(ReplicaConfig(cpu_bind="nobind"), 5, cores=2) == "nobind"
    after = ReplicaConfig(num_cpus=1, cpu_first_core=1)  # a second pool on the node: its own cores, then wrapping
    assert [device.cpu_bind(after, r, cores=2) for r in range(2)] == ["1", "0"]
    assert device.cpu_bind(ReplicaConfig(num_cpus=2, cpu_first_core=2), 0, cores=4) == "2-3"
    with pytest.raises(ValueError, match="cpu_first_core must be >= 0"):
        ReplicaConfig(cpu_first_core=-1)
    env = device.engine_env(ReplicaConfig(cpu_kvcache_gib=2), 1)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and "VLLM_CPU_OMP_THREADS_BIND" in env


def test_cpu_engine_runs_its_model_in_the_engine_core_process_under_the_replicas_cores(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "2-3")
    env = device.inproc_worker_env(ReplicaConfig(num_cpus=2))
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2", "OMP_PLACES": "{2,3}",
                   "OMP_PROC_BIND": "true"}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0,5")
    assert device.inproc_worker_env(ReplicaConfig())["OMP_PLACES"] == "{0,5}"
    for bind in ("auto", "nobind", "0|1", "", "a-b"):  # vLLM's own worker process sets these up
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
        assert device.inproc_worker_env(ReplicaConfig()) == {}, bind
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    assert device.inproc_worker_env(ReplicaConfig(cpu_worker_process=True)) == {}
    assert device.inproc_worker_env(ReplicaConfig(num_gpus=1)) == {}


def test_gpu_shape_follows_vllm_ray_conventions():
    tp = ReplicaConfig(num_gpus=1, tensor_parallel_size=4)
    assert device.bundles(tp) == [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert device.actor_resources(tp) == {"num_cpus": 0, "num_gpus": 0}
    assert device.executor_backend(tp) == "ray"
    assert device.dtype(tp) == "bfloat16" and device.dtype(ReplicaConfig()) == "float32"
    assert device.engine_env(tp, 0) == {}
    single = ReplicaConfig(num_gpus=1)
    assert device.actor_resources(single) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert device.executor_backend(single) is None
