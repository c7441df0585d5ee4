"""The example run configs in cluster/configs load as RunConfig and say what their comments say."""

import dataclasses
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest
import yaml

from cluster.engine_args import check_engine_kwargs, engine_arg_names
from engine.config import RunConfig, load_yaml

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"

CONFIGS = sorted((CLUSTER / "configs").glob("*.yaml"))
GPU_CONFIGS = [p for p in CONFIGS if p.stem != "iris_local"]


def test_the_three_documented_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"iris_local", "gsm8k_llama3_8b", "hotpotqa_mistral_7b"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_with_an_absolute_run_dir(path):
    cfg = load_yaml(path)
    # `ray job submit --working-dir .` runs the driver in a temporary copy of the checkout
    assert Path(cfg.run_dir).is_absolute()
    assert isinstance(cfg.lora.lr, float)  # YAML reads `1e-5` (no dot) as a string


def test_iris_local_is_the_embedded_default_except_the_run_dir():
    cfg = load_yaml(CLUSTER / "configs" / "iris_local.yaml")
    assert cfg.run_dir != RunConfig().run_dir
    assert dataclasses.replace(cfg, run_dir=RunConfig().run_dir) == RunConfig()


def test_gsm8k_runs_8_single_gpu_replicas_and_trains_on_4_gpus_with_the_papers_lora():
    cfg = load_yaml(CLUSTER / "configs" / "gsm8k_llama3_8b.yaml")
    assert (cfg.program, cfg.model, cfg.strategy) == ("gsm8k", "meta-llama/Meta-Llama-3-8B-Instruct", "p -> w -> p")
    assert (cfg.replicas, cfg.gpus_per_replica, cfg.tensor_parallel_size, cfg.lifecycle) == (8, 1, 1, "relaunch")
    assert (cfg.lora.num_workers, cfg.lora.use_gpu) == (4, True)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.epochs, cfg.lora.lr) == (32, 64, 0.0, 5, 1e-5)
    assert cfg.lora.target_modules == ("q_proj", "k_proj")
    assert (cfg.prompt.max_bootstrapped_demos, cfg.prompt.max_labeled_demos) == (3, 3)
    assert cfg.engine_kwargs["dtype"] == "bfloat16"
    assert (cfg.train_size, cfg.val_size) == (200, 300)


def test_hotpotqa_is_a_hotswap_run_with_separate_serving_and_training_gpus():
    cfg = load_yaml(CLUSTER / "configs" / "hotpotqa_mistral_7b.yaml")
    assert (cfg.program, cfg.model, cfg.lifecycle) == ("hotpotqa", "mistralai/Mistral-7B-Instruct-v0.2", "hotswap")
    assert (cfg.replicas, cfg.gpus_per_replica, cfg.lora.num_workers, cfg.lora.use_gpu) == (4, 1, 4, True)
    assert cfg.program_args["retriever"].startswith(("http://", "https://", "bm25:"))


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.stem)
def test_gpu_configs_reach_the_papers_effective_batch_of_8(path):
    lora = load_yaml(path).lora
    accumulation = lora.batch_size // (lora.micro_batch_size * lora.num_workers)  # as actors.training.loop does
    assert accumulation >= 1
    assert lora.micro_batch_size * lora.num_workers * accumulation == lora.batch_size == 8


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.stem)
def test_gpu_engine_kwargs_are_vllm_engine_args_with_consistent_lora_limits(path):
    kwargs = load_yaml(path).engine_kwargs
    assert kwargs.get("max_cpu_loras", kwargs.get("max_loras", 1)) >= kwargs.get("max_loras", 1)
    names = engine_arg_names()
    if names is None:
        pytest.skip("vllm not installed: engine-arg names unknown")
    check_engine_kwargs(kwargs, names, str(path))


def test_a_misspelt_engine_arg_is_named():
    with pytest.raises(ValueError, match=r"unknown vLLM engine args \['gpu_mem_util'\]"):
        check_engine_kwargs({"dtype": "bfloat16", "gpu_mem_util": 0.9}, {"dtype", "gpu_memory_utilization"})


def test_engine_arg_names_come_from_both_engine_args_classes(tmp_path):
    source = tmp_path / "arg_utils.py"
    source.write_text("class EngineArgs:\n    model: str = 'm'\n    dtype: str = 'auto'\n"
                      "class AsyncEngineArgs(EngineArgs):\n    enable_log_requests: bool = False\n"
                      "class Other:\n    nope: int = 0\n")
    assert engine_arg_names(source) == {"model", "dtype", "enable_log_requests"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_program_and_data_args_fit_the_program_when_it_exists(path):
    cfg = load_yaml(path)
    module = f"programs.{cfg.program}"
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    mod = importlib.import_module(module)
    inspect.signature(mod.Program).bind(**cfg.program_args)
    inspect.signature(mod.load_splits).bind(cfg.seed, **cfg.data_args)
    # the loader must cut at least as many examples as the run then takes
    assert cfg.data_args.get("train_size", cfg.train_size) >= cfg.train_size
    assert cfg.data_args.get("dev_size", cfg.val_size) >= cfg.val_size


@pytest.mark.parametrize("section, key, message", [
    (None, "replica", r"unknown keys \['replica'\]"),
    ("lora", "rnak", r"lora: unknown keys \['rnak'\]"),
    ("prompt", "num_candidates", r"prompt: unknown keys \['num_candidates'\]"),
])
def test_a_config_with_an_unknown_key_is_refused_by_name(tmp_path, section, key, message):
    data = yaml.safe_load((CLUSTER / "configs" / "gsm8k_llama3_8b.yaml").read_text())
    (data[section] if section else data)[key] = 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message):
        load_yaml(broken)
