"""Connecting to Ray: an existing cluster when there is one, else a local one set up for vLLM.

Knows one rule that matters for vLLM replicas: vLLM's engine process does not die with a killed
parent (vllm#55510), so a local Ray is started with per-worker process groups, which the raylet
kills whole when a worker dies. On a cluster set the same variable on `ray start` (see cluster/).
Not Ray's older subreaper switch: it makes every worker ignore SIGCHLD, so a job's entrypoint
exit code reads as 0 and a failed `ray job submit` run is reported SUCCEEDED.
Does not know pools or models.
"""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)

CHILD_CLEANUP = "RAY_process_group_cleanup_enabled"


def connect(address: str | None = None, num_cpus: int | None = None, namespace: str = "tandem") -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``) if given, else start a local Ray; no-op if connected.

    Args:
        address: a Ray address ('auto', 'ray://…', 'host:port'); None starts a local Ray
            unless ``RAY_ADDRESS`` is set.
        num_cpus: CPUs of a local Ray (default all cores).
        namespace: the Ray namespace pools are named in.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=True)
        logger.info("joined Ray cluster at %s", address)
        return
    os.environ.setdefault(CHILD_CLEANUP, "1")
    ray.init(num_cpus=num_cpus, namespace=namespace, log_to_driver=True)  # dashboard: state API
    logger.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
