"""The AWS cluster-launcher YAML: Ray's own schema, a CPU-free head, pinned image and packages."""

import copy
import re
from pathlib import Path

import pytest

from actors.runtime import CHILD_CLEANUP
from cluster.manifests import check_launcher, images, load, ray_version_of

CLUSTER = Path(__file__).resolve().parents[3] / "cluster"
AWS = CLUSTER / "launcher" / "aws.yaml"


@pytest.fixture
def config() -> dict:
    return load(AWS)


def test_launcher_config_validates_against_rays_schema(config):
    check_launcher(config, AWS.name)


def test_ray_fills_and_validates_it_as_ray_up_would(config):
    # private Ray API, offline (no boto3, no AWS call): defaults merged, then Ray's own validation
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("boto3" in c for c in prepared["head_setup_commands"])  # Ray's default kept: the autoscaler needs it


def test_image_is_the_pinned_ray_gpu_image(config, ray_pin):
    (image,) = images(config)
    assert ray_version_of(image) == ray_pin and image.endswith("-gpu")


def test_setup_installs_the_project_with_the_gpu_extras_at_the_runtime_env_pins(config):
    commands = " ; ".join(config["setup_commands"])
    assert re.search(r"pip install -e \S*tandem\[gpu,deepspeed\]", commands)
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==(\S+)", commands))
    runtime_pins = dict(r.split("==") for r in load(CLUSTER / "runtime_env.yaml")["pip"] if "==" in r)
    assert pins and all(runtime_pins[name] == version for name, version in pins.items())
    assert config["file_mounts"]["/home/ray/tandem"] == "."


def test_head_starts_with_no_cpus_and_every_raylet_with_process_group_cleanup(config):
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "--num-cpus=0" in head
    assert f"{CHILD_CLEANUP}=1 ray start" in head and f"{CHILD_CLEANUP}=1 ray start" in worker


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(min_worker=1), r"\(top level\): Additional properties are not allowed \('min_worker'"),
    (lambda c: c["available_node_types"]["gpu"].update(resources={"GPU": 0.5}),
     r"available_node_types.gpu.resources.GPU"),
    (lambda c: c["docker"].update(imag="x"), r"docker: Additional properties.*'imag'"),
    (lambda c: c.pop("provider"), "'provider' is a required property"),
    (lambda c: c.update(head_node_type="ray.head.default"), "head_node_type 'ray.head.default' is not one of"),
    (lambda c: c["available_node_types"]["head"].update(resources={"CPU": 8}), "head.resources.CPU must be 0"),
    (lambda c: c["available_node_types"]["gpu"].update(max_workers=0), "no worker type with max_workers > 0"),
])
def test_a_broken_launcher_config_is_refused_with_the_field_named(config, change, message):
    change(config)
    with pytest.raises(ValueError, match=message):
        check_launcher(config)
