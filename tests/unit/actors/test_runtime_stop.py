"""A stop signal keeps its exit code when it arrives while the driver waits in ``ray.get``.

Ray's wait loop catches the ``Stopped`` our handler raises and raises a bare
``KeyboardInterrupt()`` instead; CI saw ``tandem run`` exit 130 for a SIGTERM that came while the
weight step killed its replicas. Each case runs in its own interpreter (signal handlers and a
local Ray are process-wide).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actors.runtime import Stopped, stop_of

SCRIPT = textwrap.dedent("""
    import os, signal, threading, time
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    import ray
    from actors.runtime import connect, stop_of, stop_on_signals

    stop_on_signals()
    connect(num_cpus=1)

    @ray.remote
    def slow():
        time.sleep(120)

    ref = slow.remote()
    threading.Timer(2, lambda: os.kill(os.getpid(), signal.{sig})).start()
    try:
        ray.get(ref)
    except KeyboardInterrupt as exc:
        print("raised", type(exc).__name__, "exit", stop_of(exc).exit_code, flush=True)
    finally:
        ray.shutdown()
""")


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_ray_get_keeps_its_exit_code(sig, code):
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(sig=sig)], cwd=root, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f" exit {code}" in out.stdout, out.stdout + out.stderr[-3000:]


def test_a_plain_keyboard_interrupt_is_a_ctrl_c():
    assert stop_of(KeyboardInterrupt()).exit_code == 130
    stop = Stopped(15)
    assert stop_of(stop) is stop and stop.exit_code == 143
