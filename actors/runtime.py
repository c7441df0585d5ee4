"""Connecting to Ray: an existing cluster when there is one, else a local one set up for vLLM.

Knows one rule that matters for vLLM replicas: vLLM's engine process does not die with a killed
parent (vllm#55510), so a local Ray is started with per-worker process groups, which the raylet
kills whole when a worker dies. On a cluster set the same variable on `ray start` (see cluster/).
Not Ray's older subreaper switch: it makes every worker ignore SIGCHLD, so a job's entrypoint
exit code reads as 0 and a failed `ray job submit` run is reported SUCCEEDED.
Also knows stopping: ``stop_on_signals()`` (the CLI's) makes SIGINT and SIGTERM — what Ctrl-C,
docker, systemd and Kubernetes send — raise ``Stopped`` in the main thread, so ``finally`` blocks
kill replicas and Serve before the process exits with 128 + the signal number; ``ray.init``
(which installs its own SIGTERM handler) keeps it. ``cluster_now()`` reads what the cluster can
hold (the replicas' and the training workers' fit checks both use it); ``run_slug()`` is the run dir's
name as the Ray names of a run (pools, Serve apps) carry it. Does not know pools or models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Iterator

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
        with _stop_handlers_kept():
            try:
                ray.init(address=address, namespace=namespace, log_to_driver=True)
            except ConnectionError as exc:  # Ray logs the cause (InvalidAuthToken) but raises only this
                if os.environ.get("RAY_AUTH_MODE") == "token":
                    raise
                raise ConnectionError(f"{exc}; if the cluster uses token authentication (Ray 2.60's `ray start` turns "
                                      "it on when it finds a token file), set RAY_AUTH_MODE=token and the token "
                                      "(RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)") from exc
        logger.info("joined Ray cluster at %s", address)
        return
    os.environ.setdefault(CHILD_CLEANUP, "1")
    with _stop_handlers_kept():
        ray.init(num_cpus=num_cpus, namespace=namespace, log_to_driver=True)  # dashboard: state API
    logger.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (``finally`` blocks clean up), then exit ``exit_code``.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles SIGTERM the same way.
    """

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stopping = threading.Event()
_stopped_by: list[int] = []  # the signal that set _stopping


def _raise_stopped(signum: int, frame) -> None:
    if _stopping.is_set():  # cleanup is under way: let it finish (SIGKILL forces)
        logger.warning("%s: already stopping, cleaning up", signal.Signals(signum).name)
        return
    _stopped_by[:] = [signum]
    _stopping.set()
    raise Stopped(signum)


def stop_of(exc: KeyboardInterrupt) -> Stopped:
    """The stop behind ``exc``, which may have lost its signal on the way up.

    A ``Stopped`` raised while the main thread waits in ``ray.get`` reaches the caller as a bare
    ``KeyboardInterrupt()``: Ray's wait loop catches it and raises its own. The signal that
    arrived is remembered here, so SIGTERM still exits 143; a plain Ctrl-C reads as SIGINT.
    """
    if isinstance(exc, Stopped):
        return exc
    return Stopped(_stopped_by[0] if _stopping.is_set() and _stopped_by else signal.SIGINT)


def stopping() -> bool:
    """True once a stop signal arrived: work still queued in other threads should not start."""
    return _stopping.is_set()


def stop_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise ``Stopped`` in the main thread (call it there).

    Example:
        >>> stop_on_signals()  # doctest: +SKIP
        >>> try: run(cfg)  # doctest: +SKIP
        ... except Stopped as stop: sys.exit(stop.exit_code)
    """
    _stopping.clear()
    _stopped_by.clear()
    for sig in _SIGNALS:
        signal.signal(sig, _raise_stopped)


@contextlib.contextmanager
def _stop_handlers_kept() -> Iterator[None]:
    """Put ``stop_on_signals``' handlers back after a block that replaces them (``ray.init``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = [sig for sig in _SIGNALS if signal.getsignal(sig) is _raise_stopped]
    try:
        yield
    finally:
        for sig in ours:
            signal.signal(sig, _raise_stopped)


def cluster_now() -> tuple[dict, list[dict] | None]:
    """The cluster's resources (an autoscaler's maximum where it has one) and, if it cannot grow,
    each alive node's."""
    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:  # the private call Ray Train 2.60 itself makes before it waits (worker_group.py)
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 -- without it the static check below still holds
        logger.debug("no autoscaler limits", exc_info=True)
        limits = None
    if limits:
        return {k: max(total.get(k, 0.0), float(limits.get(k, 0))) for k in {*total, *limits}}, None
    return total, [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def run_slug(run_dir: str | Path) -> str:
    """The run dir's own name, cut to what a Ray name may carry (runs sharing a cluster tell their pools
    and Serve apps apart by it).

    Example:
        >>> run_slug("/data/runs/iris seed 0/")
        'iris-seed-0'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(run_dir).resolve().name)[:40] or "run"
