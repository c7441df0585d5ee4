"""Offline checks of the files in ``cluster/``: runtime envs, KubeRay manifests, launcher YAML.

Knows: Ray's own validation of a runtime env (``ray.runtime_env.RuntimeEnv``, pure Python, starts
nothing) plus a refusal of unknown top-level keys (Ray forwards those to plugins silently); the
fields of a KubeRay ``ray.io/v1`` RayJob / RayService that Tandem relies on (a CPU head with
``num-cpus: "0"``, GPU worker groups, images, the embedded runtime env / Serve config, which is
checked with Ray Serve's ``ServeDeploySchema``); the cluster launcher's JSON schema shipped inside
ray (``ray/autoscaler/ray-schema.json``); pin drift between a pip list and pyproject.toml.
Every failure is a ``ValueError`` naming the file and the field path.

Does not know Kubernetes' or KubeRay's full CRD schemas (no cluster, no CRDs here: only the fields
above are checked), nor whether images, URLs or volumes exist. Does not import Tandem's packages;
tests combine these checks with ``engine.config`` and ``serve.app``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

GPU = "nvidia.com/gpu"
_IMAGE_VERSION = re.compile(r"^rayproject/ray(?:-ml|-llm)?:(\d+\.\d+\.\d+)(?:-[\w.-]+)?$")


def load(path: str | Path) -> Any:
    """The YAML document in ``path`` (one document per file here)."""
    return yaml.safe_load(Path(path).read_text())


def check_runtime_env(data: Any, where: str = "runtime_env") -> dict:
    """Validate a runtime env mapping the way Ray does, and refuse keys Ray would not use.

    Returns:
        The env as Ray normalizes it (``pip`` becomes ``{"packages": [...], ...}``).

    Raises:
        ValueError: not a mapping, an unknown key (named, with the known ones) or a value Ray
            rejects (Ray's message, prefixed with ``where``).

    Example:
        >>> check_runtime_env({"env_vars": {"A": "1"}})["env_vars"]
        {'A': '1'}
    """
    from ray.runtime_env import RuntimeEnv

    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = RuntimeEnv.known_fields - RuntimeEnv.extensions_fields
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    try:
        return dict(RuntimeEnv(**data))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def check_rayjob(data: Any, where: str = "RayJob") -> None:
    """A KubeRay RayJob that runs ``python -m engine run`` on a CPU head + GPU workers.

    Raises:
        ValueError: a missing or wrong field, named by its path (``spec.entrypoint``, ...).
    """
    _check_kind(data, "RayJob", where)
    entry = _get(data, "spec.entrypoint", where)
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{where}: spec.entrypoint must be a non-empty command")
    env_yaml = _get(data, "spec.runtimeEnvYAML", where)
    check_runtime_env(_parse_yaml_string(env_yaml, f"{where}: spec.runtimeEnvYAML"), f"{where}: spec.runtimeEnvYAML")
    _check_cluster(_get(data, "spec.rayClusterSpec", where), f"{where}: spec.rayClusterSpec")


def check_rayservice(data: Any, where: str = "RayService") -> dict:
    """A KubeRay RayService whose ``serveConfigV2`` Ray Serve accepts.

    Returns:
        The parsed ``serveConfigV2`` (a Serve config mapping).

    Raises:
        ValueError: a missing or wrong field, or Serve's schema error, named by its path.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    _check_kind(data, "RayService", where)
    serve_config = _parse_yaml_string(_get(data, "spec.serveConfigV2", where), f"{where}: spec.serveConfigV2")
    try:
        ServeDeploySchema.model_validate(serve_config)
    except ValidationError as exc:
        raise ValueError(f"{where}: spec.serveConfigV2: {exc}") from None
    for i, app in enumerate(serve_config.get("applications") or []):
        if "runtime_env" in app:
            check_runtime_env(app["runtime_env"], f"{where}: spec.serveConfigV2.applications[{i}].runtime_env")
    _check_cluster(_get(data, "spec.rayClusterConfig", where), f"{where}: spec.rayClusterConfig")
    return serve_config


def check_launcher(data: Any, where: str = "cluster launcher config") -> None:
    """A Ray cluster-launcher config: ray's JSON schema, a head type that exists and has 0 CPUs.

    Raises:
        ValueError: the schema error with its path, or a head/worker rule broken.
    """
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as exc:
        path = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(f"{where}: {path}: {exc.message}") from None
    types = data.get("available_node_types") or {}
    head = data.get("head_node_type")
    if head not in types:
        raise ValueError(f"{where}: head_node_type {head!r} is not one of available_node_types {sorted(types)}")
    if types[head].get("resources", {}).get("CPU") != 0:
        raise ValueError(f"{where}: available_node_types.{head}.resources.CPU must be 0 (nothing heavy on the head)")
    if not any(t.get("max_workers", 0) > 0 for name, t in types.items() if name != head):
        raise ValueError(f"{where}: available_node_types has no worker type with max_workers > 0")


def images(data: Any) -> list[str]:
    """Every container ``image`` in a manifest or config, in document order."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key in ("image", "worker_image", "head_image") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(images(value))
    elif isinstance(data, list):
        for item in data:
            found.extend(images(item))
    return found


def ray_version_of(image: str) -> str:
    """The Ray version in a ``rayproject/ray:X.Y.Z[-pyNNN][-gpu]`` tag.

    Raises:
        ValueError: not a versioned rayproject image (``latest``, a digest, another repo).

    Example:
        >>> ray_version_of("rayproject/ray:2.60.0-py311-gpu")
        '2.60.0'
    """
    match = _IMAGE_VERSION.match(image)
    if not match:
        raise ValueError(f"image {image!r} is not a versioned rayproject/ray image (rayproject/ray:X.Y.Z-...)")
    return match.group(1)


def pin_drift(pip: Iterable[str], pyproject: Mapping[str, Any], extras: Iterable[str] = ("gpu", "deepspeed"),
              not_shipped: Iterable[str] = (), not_in_pyproject: Iterable[str] = ()) -> list[str]:
    """Differences between a pip list and pyproject's dependencies (+ the given extras).

    Args:
        pip: requirement strings (``name<spec>``), e.g. a runtime env's ``pip`` list.
        pyproject: the parsed pyproject.toml.
        extras: optional-dependency groups that count as required (default: those a GPU cluster
            installs, as cluster/launcher/aws.yaml does).
        not_shipped: pyproject packages the pip list may leave out (e.g. what the image has).
        not_in_pyproject: pip packages pyproject does not list yet (still compared if it does).

    Returns:
        One line per problem: a different specifier, a package missing from either side.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def by_name(reqs: Iterable[str]) -> dict[str, Any]:
        parsed = (Requirement(r) for r in reqs)
        return {canonicalize_name(r.name): r for r in parsed}

    project = pyproject["project"]
    wanted = by_name([*project.get("dependencies", []),
                      *(r for e in extras for r in project.get("optional-dependencies", {}).get(e, []))])
    have = by_name(pip)
    skip = {canonicalize_name(n) for n in not_shipped}
    extra_ok = {canonicalize_name(n) for n in not_in_pyproject}
    problems = [f"{n}: pyproject has '{wanted[n]}', pip list has '{have[n]}'"
                for n in sorted(set(wanted) & set(have)) if wanted[n].specifier != have[n].specifier]
    problems += [f"{n}: in pyproject ('{wanted[n]}') but not in the pip list"
                 for n in sorted(set(wanted) - set(have) - skip)]
    problems += [f"{n}: in the pip list ('{have[n]}') but not in pyproject"
                 for n in sorted(set(have) - set(wanted) - extra_ok)]
    return problems


def _check_kind(data: Any, kind: str, where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping at the top level")
    if _get(data, "apiVersion", where) != "ray.io/v1":
        raise ValueError(f"{where}: apiVersion must be 'ray.io/v1', got {data['apiVersion']!r}")
    if _get(data, "kind", where) != kind:
        raise ValueError(f"{where}: kind must be {kind!r}, got {data['kind']!r}")
    if not _get(data, "metadata.name", where):
        raise ValueError(f"{where}: metadata.name must be non-empty")


def _check_cluster(spec: Any, where: str) -> None:
    """Head: CPU only, ``num-cpus: "0"``; every worker group: containers with images and GPUs."""
    _get(spec, "rayVersion", where)
    head = _get(spec, "headGroupSpec", where)
    params = _get(head, "rayStartParams", where, "headGroupSpec.")
    _check_start_params(params, f"{where}: headGroupSpec.rayStartParams")
    if params.get("num-cpus") != "0":
        raise ValueError(f"{where}: headGroupSpec.rayStartParams.num-cpus must be \"0\" (a CPU-free head)")
    for c, container in enumerate(_containers(head, where, "headGroupSpec")):
        if _limits(container).get(GPU):
            raise ValueError(f"{where}: headGroupSpec.template.spec.containers[{c}] asks for GPUs "
                             "(the head is CPU only)")
    groups = _get(spec, "workerGroupSpecs", where)
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{where}: workerGroupSpecs must be a non-empty list")
    for g, group in enumerate(groups):
        prefix = f"workerGroupSpecs[{g}]"
        _get(group, "groupName", where, prefix + ".")
        _check_start_params(_get(group, "rayStartParams", where, prefix + "."), f"{where}: {prefix}.rayStartParams")
        for c, container in enumerate(_containers(group, where, prefix)):
            gpus = _limits(container).get(GPU)
            if not isinstance(gpus, int) or gpus < 1:
                raise ValueError(f"{where}: {prefix}.template.spec.containers[{c}].resources.limits.{GPU} "
                                 f"must be a positive integer, got {gpus!r}")


def _containers(group: Any, where: str, prefix: str) -> list[Mapping]:
    containers = _get(group, "template.spec.containers", where, prefix + ".")
    if not isinstance(containers, list) or not containers:
        raise ValueError(f"{where}: {prefix}.template.spec.containers must be a non-empty list")
    for c, container in enumerate(containers):
        for key in ("name", "image"):
            if not isinstance(container, Mapping) or not container.get(key):
                raise ValueError(f"{where}: {prefix}.template.spec.containers[{c}].{key} is missing")
    return containers


def _limits(container: Mapping) -> Mapping:
    return (container.get("resources") or {}).get("limits") or {}


def _check_start_params(params: Any, where: str) -> None:
    """KubeRay's rayStartParams is map[string]string: unquoted numbers are refused by the API server."""
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    for key, value in params.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}.{key}: must be a string (quote it), got {value!r}")


def _get(data: Any, path: str, where: str, prefix: str = "") -> Any:
    node = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{where}: {prefix}{path} is missing")
        node = node[part]
    return node


def _parse_yaml_string(text: Any, where: str) -> dict:
    if not isinstance(text, str):
        raise ValueError(f"{where}: must be a YAML string (use `|`), got {type(text).__name__}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping")
    return data
