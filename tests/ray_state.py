"""Ray's state API, asked of the Ray this process is connected to.

``ray.util.state`` without an address looks for *a* local Ray and fails with "Found multiple active
Ray instances" when another one runs on the machine (a user's own, another session's): the tests
ask theirs by its GCS address.
"""

import ray
from ray.util.state import list_actors, list_placement_groups


def _address() -> str:
    return ray.get_runtime_context().gcs_address


def alive_actors(name_part: str) -> list:
    """Live actors whose name contains ``name_part``."""
    return [a for a in list_actors(address=_address(), filters=[("state", "=", "ALIVE")]) if name_part in (a.name or "")]


def created_placement_groups() -> list:
    """Placement groups in state CREATED."""
    return [p for p in list_placement_groups(address=_address()) if p.state == "CREATED"]
