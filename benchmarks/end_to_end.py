"""Wall-clock of the embedded default ``p -> w -> p`` (Iris, SmolLM2-135M, 2 vLLM-CPU replicas).

Runs ``engine.run.run`` with the default ``RunConfig`` into a fresh run dir and prints the time
and score of every step (from the step records) and the total, with a fresh DSPy disk cache (no
answer reused from an earlier run). Target: <= 10 min on 2 cores.

    python benchmarks/end_to_end.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="benchmarks/out/e2e-run")
    ap.add_argument("--out", default="benchmarks/out/end_to_end.json")
    ap.add_argument("--warm-cache", action="store_true", help="reuse DSPy's disk cache (default: a fresh one)")
    args = ap.parse_args()
    if not args.warm_cache:  # every LM call really runs; set before dspy is imported
        import tempfile

        os.environ["DSPY_CACHEDIR"] = tempfile.mkdtemp(prefix="tandem-e2e-dspy-cache-")

    from engine.config import RunConfig
    from engine.report.run_report import step_rows
    from engine.run import run

    shutil.rmtree(args.run_dir, ignore_errors=True)
    started = time.perf_counter()
    outcome = run(RunConfig(run_dir=args.run_dir))
    total = time.perf_counter() - started
    rows = step_rows(args.run_dir)
    print("| step | strategy | valset score % | wall s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['strategy']} | {r['score']} | {r['wall_s']} |")
    print(f"\ntotal wall (incl. pool launch/kill and report) = {total:.0f} s  (target <= 600 s); "
          f"best '{outcome.best_strategy}' {outcome.best_score}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "end_to_end", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
        "cpus": os.cpu_count(), "total_s": total, "best": outcome.best_strategy, "scores": outcome.scores,
        "steps": [{k: r[k] for k in ("step", "strategy", "score", "wall_s")} for r in rows]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
