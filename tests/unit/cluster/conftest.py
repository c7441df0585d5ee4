"""Fixtures shared by the cluster tests: the parsed pyproject.toml and its ray pin."""

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="session")
def ray_pin(pyproject) -> str:
    """The exact ray version pyproject pins (``ray[...]==X.Y.Z``)."""
    from packaging.requirements import Requirement

    (req,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "ray"]
    (spec,) = req.specifier
    assert spec.operator == "=="
    return spec.version
