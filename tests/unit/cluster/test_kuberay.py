"""The KubeRay RayJob and RayService: required fields, their embedded runtime env / Serve config,
images at the pinned Ray version, and a refusal naming the field for each kind of breakage."""

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from actors.runtime import CHILD_CLEANUP
from cluster.manifests import check_rayjob, check_rayservice, images, load, ray_version_of
from engine.cli import build_parser
from engine.config import load_yaml
from serve.app import ServeConfig

ROOT = Path(__file__).resolve().parents[3]
CLUSTER = ROOT / "cluster"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
GPU = "nvidia.com/gpu"


@pytest.fixture
def job() -> dict:
    return load(RAYJOB)


@pytest.fixture
def service() -> dict:
    return load(RAYSERVICE)


def _cluster(manifest: dict) -> dict:
    return manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]


def _containers(manifest: dict) -> list[dict]:
    spec = _cluster(manifest)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayjob_runs_a_shipped_config_through_the_cli(job):
    check_rayjob(job, RAYJOB.name)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "engine"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "run"
    config = ROOT / args.config
    assert config.parent == CLUSTER / "configs" and config.is_file()
    load_yaml(config)


def test_rayjob_cleans_up_and_gives_up(job):
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 0
    assert "entrypointNumCpus" not in spec  # the head has num-cpus 0: the driver must need none


def test_rayjob_runtime_env_is_the_gpu_runtime_env_plus_a_remote_working_dir(job):
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shipped = load(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"].startswith("https://") and env["working_dir"].endswith(".zip")
    assert (env["pip"], env["env_vars"], env["config"]) == (shipped["pip"], shipped["env_vars"], shipped["config"])


def test_rayjob_workers_hold_the_gpus_the_config_needs(job):
    cfg = load_yaml(ROOT / shlex.split(job["spec"]["entrypoint"])[-1])
    have = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"][GPU]
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    serving = cfg.replicas * cfg.gpus_per_replica * cfg.tensor_parallel_size
    training = cfg.lora.num_workers if cfg.lora.use_gpu else 0
    need = max(serving, training) if cfg.lifecycle == "relaunch" else serving + training
    assert have >= need


def test_rayservice_serves_a_run_dir_with_args_serve_app_accepts(service):
    serve_config = check_rayservice(service, RAYSERVICE.name)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serve.app:app"
    cfg = ServeConfig.from_args(app["args"])
    assert Path(cfg.run_dir).is_absolute() and cfg.lm_gpus >= 1
    assert "token" not in app["args"]  # the token comes from a Secret, not the manifest
    from serve.deployments import LMServer, ProgramServer

    assert {d["name"] for d in app["deployments"]} == {LMServer.name, ProgramServer.name}
    shipped = load(CLUSTER / "runtime_env.yaml")
    assert (app["runtime_env"]["pip"], app["runtime_env"]["env_vars"]) == (shipped["pip"], shipped["env_vars"])


def test_rayservice_gpu_pods_can_hold_the_autoscaled_lm_replicas(service):
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    cfg = ServeConfig.from_args(app["args"])
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["maxReplicas"] * limits[GPU] >= cfg.lm_max_replicas * cfg.lm_gpus
    assert int(limits["cpu"]) >= cfg.lm_cpus


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.stem)
def test_images_and_ray_version_match_the_pinned_ray(path, ray_pin):
    manifest = load(path)
    found = images(manifest)
    assert len(found) == len(_containers(manifest)) >= 2
    assert {ray_version_of(i) for i in found} == {_cluster(manifest)["rayVersion"]} == {ray_pin}


@pytest.mark.parametrize("path", [RAYJOB, RAYSERVICE], ids=lambda p: p.stem)
def test_every_raylet_kills_orphaned_vllm_processes(path):
    for container in _containers(load(path)):
        assert {"name": CHILD_CLEANUP, "value": "1"} in container["env"], container["name"]


def test_ray_version_of_refuses_unversioned_images():
    assert ray_version_of("rayproject/ray:2.60.0") == "2.60.0"
    with pytest.raises(ValueError, match="rayproject/ray:latest"):
        ray_version_of("rayproject/ray:latest")


def _drop(data, *keys) -> None:
    for key in keys[:-1]:
        data = data[key]
    del data[keys[-1]]


HEAD = ("spec", "rayClusterSpec", "headGroupSpec")
WORKER_CONTAINER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0)


@pytest.mark.parametrize("keys, message", [
    (("spec", "entrypoint"), "spec.entrypoint is missing"),
    (("metadata", "name"), "metadata.name is missing"),
    (("spec", "runtimeEnvYAML"), "spec.runtimeEnvYAML is missing"),
    ((*HEAD, "rayStartParams"), "headGroupSpec.rayStartParams is missing"),
    ((*WORKER_CONTAINER, "image"), r"workerGroupSpecs\[0\].template.spec.containers\[0\].image is missing"),
    ((*WORKER_CONTAINER, "resources", "limits", GPU),
     r"workerGroupSpecs\[0\].template.spec.containers\[0\].resources.limits.nvidia.com/gpu must be"),
], ids=lambda v: v[-1] if isinstance(v, tuple) else None)
def test_rayjob_missing_a_field_is_refused_by_path(job, keys, message):
    broken = copy.deepcopy(job)
    _drop(broken, *keys)
    with pytest.raises(ValueError, match=message):
        check_rayjob(broken)


def test_rayjob_with_a_gpu_head_an_unquoted_param_or_a_bad_runtime_env_is_refused(job):
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(ValueError, match=r"rayStartParams.num-cpus: must be a string"):
        check_rayjob(broken)
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"][GPU] = 1
    with pytest.raises(ValueError, match="the head is CPU only"):
        check_rayjob(broken)
    broken = copy.deepcopy(job)
    broken["spec"]["runtimeEnvYAML"] += "piip: [x]\n"
    with pytest.raises(ValueError, match=r"runtimeEnvYAML: unknown keys \['piip'\]"):
        check_rayjob(broken)
    broken = copy.deepcopy(job)
    broken["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(ValueError, match="apiVersion must be 'ray.io/v1'"):
        check_rayjob(broken)


def test_rayservice_with_a_broken_serve_config_is_refused(service):
    broken = copy.deepcopy(service)
    broken["spec"]["serveConfigV2"] = broken["spec"]["serveConfigV2"].replace("import_path:", "import_pth:")
    with pytest.raises(ValueError, match=r"(?s)serveConfigV2:.*import_path"):
        check_rayservice(broken)
    broken = copy.deepcopy(service)
    del broken["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    with pytest.raises(ValueError, match="rayClusterConfig: workerGroupSpecs is missing"):
        check_rayservice(broken)
    broken = copy.deepcopy(service)
    broken["spec"]["serveConfigV2"] = yaml.safe_load(broken["spec"]["serveConfigV2"])
    with pytest.raises(ValueError, match=r"serveConfigV2: must be a YAML string"):
        check_rayservice(broken)
