"""The engine watchdog, a vLLM general plugin: a vLLM engine process dies with the replica that started it.

Whatever kills a replica (SIGKILL, the OOM killer, a driver killed with its local Ray, whose
raylet can no longer clean process groups), its engine must not live on holding memory or GPUs.
When ``TANDEM_ENGINE_WATCHDOG=1`` (``actors.inference.vllm_engine`` sets it in the replica before building
its engine) and this process was started by ``multiprocessing`` (vLLM's EngineCore, and the
workers it starts), a daemon thread polls ``os.getppid()`` every second and, once the parent that
started this process is gone, kills this process's own children and exits.
vLLM spawns its EngineCore inside a Ray actor (``vllm.utils.system_utils._maybe_force_spawn``),
so the fresh process loads this plugin in ``EngineCore.__init__``; the parent pid compared is
the one ``multiprocessing`` recorded at spawn, so a parent that died before the plugin ran is
caught too. Not started in the replica's own process (a Ray worker, no ``multiprocessing``
parent) nor in processes vLLM forks (fork copies vLLM's "plugins loaded" flag, so the plugin does
not run again there). Polling, not ``PR_SET_PDEATHSIG``: that signal fires when the parent
*thread* that started the child exits, and nothing makes that thread live as long as the replica.
Registered through the ``vllm.general_plugins`` entry point (pyproject.toml). Does not know pools.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

logger = logging.getLogger(__name__)

WATCHDOG_ENV = "TANDEM_ENGINE_WATCHDOG"
WATCHDOG_POLL_S = 1.0
_watchdog: threading.Thread | None = None


def start_watchdog(poll_s: float = WATCHDOG_POLL_S) -> bool:
    """Exit this process when the process that started it is gone (see the module docstring).

    Returns:
        True when a watchdog runs in this process (started now or before).
    """
    global _watchdog
    if _watchdog is not None:
        return True
    parent = multiprocessing.parent_process()
    if os.environ.get(WATCHDOG_ENV) != "1" or parent is None or parent.pid is None:
        return False
    _watchdog = threading.Thread(target=_watch_parent, args=(parent.pid, poll_s), daemon=True,
                                 name="tandem-engine-watchdog")
    _watchdog.start()
    logger.info("engine process %d: exits when its parent %d is gone", os.getpid(), parent.pid)
    return True


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented (to init or a subreaper)
        time.sleep(poll_s)
    logger.error("engine process %d: its parent %d is gone; killing its children and exiting",
                 os.getpid(), parent_pid)
    kill_children()
    os._exit(1)


def kill_children() -> None:
    """SIGKILL what this process started (vLLM's EngineCore and its helpers) before it exits."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=5)


def register() -> None:
    """vLLM general-plugin hook: start the watchdog when enabled (idempotent)."""
    start_watchdog()
