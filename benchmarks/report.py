"""What every benchmark writes beside its table: one JSON file with the benchmark's name, the date,
the machine, its CPU count and arguments, and its own figures. Scripts in this folder import it as
``report`` (the folder is on ``sys.path`` when one runs)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def save(out: str, benchmark: str, args: argparse.Namespace, **figures: Any) -> None:
    """Write ``figures`` to ``out`` with the run's context, and say where."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"),
                                     "machine": platform.node(), "cpus": os.cpu_count(), "args": vars(args),
                                     **figures}, indent=2))
    print(f"wrote {out}")
