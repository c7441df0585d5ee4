"""The runtime envs validate as Ray's RuntimeEnv (no cluster needed) and pin what pyproject pins."""

from pathlib import Path

import pytest
import ray

from cluster.manifests import check_runtime_env, load, pin_drift

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"
GPU_ENV = CLUSTER / "runtime_env.yaml"
LOCAL_ENV = CLUSTER / "runtime_env.local.yaml"
# pyproject packages the GPU runtime env leaves out, and why
NOT_SHIPPED = {"ray": "in the cluster image"}
NOT_IN_PYPROJECT: dict[str, str] = {}


@pytest.mark.parametrize("path", [GPU_ENV, LOCAL_ENV], ids=lambda p: p.name)
def test_runtime_envs_validate_without_starting_ray(path):
    env = check_runtime_env(load(path), path.name)
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert {".venv/", "runs/", "benchmarks/out/", ".git/"} <= set(env["excludes"])
    assert "working_dir" not in env  # given as `--working-dir .` on the command line
    assert not ray.is_initialized()


def test_gpu_env_pins_agree_with_pyproject(pyproject):
    assert pin_drift(load(GPU_ENV)["pip"], pyproject, not_shipped=NOT_SHIPPED,
                     not_in_pyproject=NOT_IN_PYPROJECT) == []


def test_gpu_env_points_caches_at_a_shared_path_and_holds_no_secret():
    env_vars = load(GPU_ENV)["env_vars"]
    assert env_vars["TANDEM_MODEL_CACHE"].startswith("/mnt/shared/")
    assert env_vars["HF_HOME"].startswith("/mnt/shared/")
    assert not {"HF_TOKEN", "TANDEM_SERVE_TOKEN"} & set(env_vars)  # the dashboard shows runtime envs


def test_local_env_installs_nothing():
    assert not {"pip", "uv", "conda"} & set(load(LOCAL_ENV))  # the venv already has the packages


def test_pin_drift_names_a_changed_a_missing_and_an_extra_package():
    pyproject = {"project": {"dependencies": ["dspy==3.4.1", "peft>=0.21.2,<0.22"],
                             "optional-dependencies": {"gpu": ["vllm==0.29.0"]}}}
    assert pin_drift(["DSPy==3.4.1", "peft<0.22,>=0.21.2", "vllm==0.29.0"], pyproject) == []
    problems = pin_drift(["dspy==3.4.0", "vllm==0.29.0", "rich"], pyproject)
    assert problems == ["dspy: pyproject has 'dspy==3.4.1', pip list has 'dspy==3.4.0'",
                        "peft: in pyproject ('peft<0.22,>=0.21.2') but not in the pip list",
                        "rich: in the pip list ('rich') but not in pyproject"]


@pytest.mark.parametrize("change, message", [
    ({"env_var": {"A": "1"}}, r"unknown keys \['env_var'\]"),  # Ray itself would pass it to plugins
    ({"env_vars": {"PYTHONUNBUFFERED": 1}}, "must be of type Dict\\[str, str\\]"),
    ({"excludes": "runs/"}, "excludes.*List\\[str\\]"),
    ({"working_dir": "ftp://host/repo.zip"}, "not a valid URI"),
])
def test_a_broken_runtime_env_is_refused_with_the_field_named(change, message):
    with pytest.raises(ValueError, match=message):
        check_runtime_env({**load(LOCAL_ENV), **change}, "broken.yaml")
