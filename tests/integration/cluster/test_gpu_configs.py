"""The shipped GPU configs (``cluster/configs/gsm8k_llama3_8b.yaml``: relaunch, 8 replicas x 1 GPU, 4
GPU training workers; ``hotpotqa_mistral_7b.yaml``: hotswap, 4 replicas x 1 GPU, 4 GPU training workers)
run end to end through ``engine.run.run`` on a local Ray with 8 fake GPUs (issue 17 §2).

What is replaced: the program and data (``gpu_program``: tiny, every trace passes), the replicas'
engines (``gpu_doubles.RecordingEngine``, the scripted engine; the model dir is the tiny model's, read
only for its tokenizer, while the model *id* stays the config's hub id), the LoRA loop
(``gpu_doubles.train_loop`` through ``$TANDEM_TEST_TRAIN_LOOP``, in the real Ray Train workers with
``use_gpu``), and sizes: 8/4/4 examples, 1 random prompt candidate, 1 CPU per replica and per worker,
0 per evaluator (the GPU layout, lifecycle, worker count, evaluator actors and LoRA settings are the
config's: the programs run in the config's evaluator actors). Everything else is the
real run: plan check, pool, placement groups, strategy, run store, adapter naming and folders, lifecycle.

Both run on one module-wide Ray (``ray.init(num_cpus=8, num_gpus=8)``): relaunch must stop the 8
replicas, which hold all 8 GPUs, before its 4 workers can get any, and serve the new adapter from the
relaunched replicas; hotswap must train on the 4 GPUs its 4 replicas do not hold and hot-load the
adapter into those same replica processes.
"""

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from ray.util.state import list_actors

import engine.run
from actors import ReplicaPool
from actors.dspy_side.finetune import adapter_dir_name
from actors.training.trainer import TEST_LOOP_ENV
from actors.runtime import CHILD_CLEANUP
from engine.config import load_yaml
from engine.store.run_store import RunStore
from tests.integration.cluster.gpu_doubles import RECORDS_ENV, read_records, recording_factory

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[3] / "cluster" / "configs"
GPUS = 8
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "train_metrics.json"}


@pytest.fixture(scope="module")
def fake_gpus(tmp_path_factory):
    """A local Ray with 8 fake GPUs whose workers inherit the records dir and the scripted loop's name."""
    if ray.is_initialized():  # the session's CPU-only Ray
        ray.shutdown()
    records = tmp_path_factory.mktemp("gpu-records")
    saved = {k: os.environ.get(k) for k in (RECORDS_ENV, TEST_LOOP_ENV, CHILD_CLEANUP)}
    os.environ.update({RECORDS_ENV: str(records), TEST_LOOP_ENV: "tests.integration.cluster.gpu_doubles:train_loop",
                       CHILD_CLEANUP: "1"})
    ray.init(num_cpus=8, num_gpus=GPUS, namespace="tandem")
    yield records
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def records(fake_gpus):
    for f in Path(fake_gpus).iterdir():
        f.unlink()
    return fake_gpus


def _scaled(name: str, run_dir: Path):
    cfg = load_yaml(CONFIGS / name)
    return replace(cfg, program="tests.integration.cluster.gpu_program", program_args={}, data_args={},
                   run_dir=str(run_dir), train_size=8, val_size=4, test_size=4, threads=8, tracking=False,
                   cpus_per_replica=1.0, prompt=replace(cfg.prompt, num_candidate_programs=1),
                   evaluators=replace(cfg.evaluators, num_cpus=0.0),  # the config's evaluator actors, on no CPU
                   lora=replace(cfg.lora, cpus_per_worker=1, resource_wait_s=30.0))


def _scripted_pools(monkeypatch, model_dir: str) -> None:
    """``engine.run.make_pool`` as it is, but recording scripted engines and the tiny model's files
    under the config's model id."""
    real = engine.run.make_pool

    def make_pool(cfg, name=None):
        pool = real(cfg, name)
        replica = replace(pool.cfg.replica, model=model_dir, model_id=cfg.model)
        return ReplicaPool(replace(pool.cfg, replica=replica), engine_factory=recording_factory)

    monkeypatch.setattr(engine.run, "make_pool", make_pool)


def _evaluators() -> set[str]:
    return {a.actor_id for a in list_actors(filters=[("class_name", "=", "Evaluator")], limit=1000)}


def _run(name, tmp_path, monkeypatch, tiny_model):
    cfg = _scaled(name, tmp_path / "run")
    _scripted_pools(monkeypatch, tiny_model)
    before = _evaluators()
    outcome = engine.run.run(cfg)
    assert not outcome.failed, f"the run failed: {outcome}"
    # the programs ran in the config's evaluator actors, and what they spent reached the run's costs
    assert cfg.evaluators.count > 0 and len(_evaluators() - before) == cfg.evaluators.count
    assert outcome.costs.lm_calls > 0 and outcome.costs.requests > 0 and outcome.costs.completion_tokens > 0
    return cfg, outcome


def _trained_adapter(cfg, run_dir: Path):
    """The w step's one adapter, checked against the run dir's layout and the naming rule."""
    steps = [r.name for r in RunStore(run_dir).steps()]
    assert steps == ["00_baseline", "01_p", "02_w", "03_p"]
    (adapter,) = next(r for r in RunStore(run_dir).steps() if r.name == "02_w").adapters
    assert re.fullmatch(re.escape(cfg.model) + r":ft-02-[0-9a-f]{8}", adapter.name), adapter.name
    assert Path(adapter.path) == (run_dir / "adapters" / adapter_dir_name(adapter.name)).resolve()
    assert ADAPTER_FILES <= {f.name for f in Path(adapter.path).iterdir()}
    assert not list((run_dir / "adapters").glob(".staging-*"))
    return adapter


def _by_kind(recs, kind):
    return [r for r in recs if r["kind"] == kind]


def _one_gpu_each(recs) -> list[str]:
    assert all(len(r["gpus"]) == 1 for r in recs), [r["gpus"] for r in recs]
    return [r["gpus"][0] for r in recs]


def test_gsm8k_relaunch_trains_on_the_replicas_gpus_and_relaunches_serving_the_adapter(
        records, tmp_path, monkeypatch, tiny_model):
    cfg, _ = _run("gsm8k_llama3_8b.yaml", tmp_path, monkeypatch, tiny_model)
    assert (cfg.lifecycle, cfg.replicas, cfg.gpus_per_replica, cfg.lora.num_workers, cfg.lora.use_gpu) == (
        "relaunch", 8, 1, 4, True)
    adapter = _trained_adapter(cfg, Path(cfg.run_dir))
    recs = read_records(records)
    loaded = {r["pid"] for r in _by_kind(recs, "replica-load") if r["adapter"] == adapter.name}
    starts = _by_kind(recs, "replica-start")
    first = [r for r in starts if r["pid"] not in loaded]
    second = [r for r in starts if r["pid"] in loaded]
    assert len(first) == len(second) == 8  # 8 replicas, then 8 relaunched processes that loaded the adapter
    assert sorted(_one_gpu_each(first)) == sorted(_one_gpu_each(second)) == [str(g) for g in range(GPUS)]
    workers = _by_kind(recs, "train-worker")
    assert sorted(r["rank"] for r in workers) == [0, 1, 2, 3] and {r["world"] for r in workers} == {4}
    trained_on = _one_gpu_each(workers)
    # the first replicas held all 8 GPUs: the workers got 4 of them only because the replicas were stopped
    assert len(set(trained_on)) == 4 and set(trained_on) <= set(_one_gpu_each(first))
    assert all(r["cuda_visible"] for r in workers) and {r["rows"] for r in workers} == {8}
    served = {r["pid"] for r in _by_kind(recs, "replica-request") if r["adapter"] == adapter.name}
    assert served and served <= loaded  # the fine-tuned program's calls reached the relaunched replicas
    assert not served & {r["pid"] for r in first}


def test_hotpotqa_hotswap_trains_on_other_gpus_and_hot_loads_into_the_live_replicas(
        records, tmp_path, monkeypatch, tiny_model):
    cfg, _ = _run("hotpotqa_mistral_7b.yaml", tmp_path, monkeypatch, tiny_model)
    assert (cfg.lifecycle, cfg.replicas, cfg.gpus_per_replica, cfg.lora.num_workers, cfg.lora.use_gpu) == (
        "hotswap", 4, 1, 4, True)
    adapter = _trained_adapter(cfg, Path(cfg.run_dir))
    recs = read_records(records)
    starts = _by_kind(recs, "replica-start")
    assert len(starts) == 4  # never relaunched
    replica_gpus = _one_gpu_each(starts)
    workers = _by_kind(recs, "train-worker")
    trained_on = _one_gpu_each(workers)
    assert len(set(replica_gpus)) == 4 and len(set(trained_on)) == 4 and not set(replica_gpus) & set(trained_on)
    replicas = {r["pid"] for r in starts}
    loaded = {r["pid"] for r in _by_kind(recs, "replica-load") if r["adapter"] == adapter.name}
    assert loaded == replicas  # hot-loaded into every live replica
    served = {r["pid"] for r in _by_kind(recs, "replica-request") if r["adapter"] == adapter.name}
    assert served and served <= replicas
