"""Serving load: K concurrent HTTP clients for S seconds against ``/v1/predict`` of a served run.

Phases (``--phases``, run in this order; default ``served,local``, plus ``fault`` with
``--kill-lm-replica-at``):
``served``: ``tandem serve``'s application (Ray Serve: FastAPI program ingress + vLLM LM
    deployment, ``--lm-replicas`` LM replicas — default 1, 2 with ``fault`` — on ``--lm-cpus``
    cores each — default 2 cores in all), called over HTTP by K client threads;
``fault`` (``--kill-lm-replica-at T``): the same application (at least 2 LM replicas), with one
    LM replica SIGKILLed from outside T seconds into the load — its process found by pid through
    Ray's state API (the alive actor ``ServeReplica:<app>:lm``, the pid's command line checked
    for it) — while the other keeps serving; reports when Serve saw the death, when a
    replacement was RUNNING again, errors by status (HTTP codes, transport exception names) with
    one message each, the load before / during / after the recovery (requests counted at their
    end), and the killed process's children left alive;
``local``: the same program, adapter and LM settings as the served program deployment (the
    run's adapter, its stop strings, greedy) called in process by K threads on a pool of as many
    replicas with the same cores (DSPy client -> router -> replica), the cost floor without
    HTTP/Serve.
Inputs cycle through the Iris test examples (DSPy's cache off on both sides). Every answer is
kept per input (a 502 counts as the answer "no parse"); each served phase's answers for an input
must equal the in-process answer for it (inputs the in-process load did not reach are answered
in process afterwards; an input answered two ways within a phase counts as differing). Prints
requests/s, p50/p99 latency, status counts, errors (goal: 0 besides 502, an answer that did not
parse) and answers equal to in process, one table row per phase; writes JSON.

    python benchmarks/serve_load.py --run-dir benchmarks/out/e2e-run --clients 8 --seconds 60
    python benchmarks/serve_load.py --run-dir RUN --clients 8 --seconds 60 --kill-lm-replica-at 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NO_PARSE = "<502: no parse>"  # the answer recorded for an answer that did not parse
LABELS = {"served": "HTTP /v1/predict (Ray Serve)", "fault": "HTTP /v1/predict, 1 LM replica SIGKILLed",
          "local": "in process (pool)"}


def _key(outputs: dict) -> str:
    """One answer as comparable text (JSON, as the HTTP response carries it)."""
    return json.dumps(outputs, sort_keys=True, default=str)


def _stats(events: list[tuple], wall: float) -> dict:
    """Counts and latency of ``(start_s, end_s, status)`` events over ``wall`` seconds."""
    lat = sorted(end - start for start, end, _ in events)
    statuses: dict[str, int] = {}
    for _, _, status in events:
        statuses[status] = statuses.get(status, 0) + 1
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
    errors = sum(n for s, n in statuses.items() if s not in ("200", "502"))
    return {"requests": len(lat), "rps": len(lat) / wall if wall > 0 else 0.0, "p50_s": pct(0.5),
            "p99_s": pct(0.99), "statuses": statuses, "errors": errors, "wall_s": wall}


def _load(call, inputs: list[dict], clients: int, seconds: float, on_start=None) -> dict:
    """Run ``call(input) -> (status, outputs | None, error message | None)`` from ``clients`` threads
    for ``seconds`` (``on_start(t0)`` first, ``t0`` the ``perf_counter`` events are relative to):
    stats, every answer per input index, one error message per status, the events."""
    events, answers, samples, lock = [], {}, {}, threading.Lock()
    started = time.perf_counter()
    stop_at = started + seconds
    if on_start is not None:
        on_start(started)

    def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                status, outputs, error = call(inputs[i % len(inputs)])
            except Exception as exc:  # a transport failure is counted, the load goes on
                status, outputs, error = type(exc).__name__, None, str(exc)[:300]
            status = str(status)
            with lock:
                events.append((t - started, time.perf_counter() - started, status))
                if status in ("200", "502"):
                    answers.setdefault(i % len(inputs), set()).add(_key(outputs) if status == "200" else NO_PARSE)
                if error and status not in samples:
                    samples[status] = error
            i += clients

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**_stats(events, time.perf_counter() - started), "answers": answers, "error_samples": samples,
            "events": events, "t0": started}


def _http_call(client):
    """``/v1/predict`` as a load call: (status, outputs of a 200, "type: error" of any other answer)."""

    def call(x: dict):
        r = client.post("/v1/predict", json=x)
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:300]}
        if r.status_code == 200:
            return 200, body["outputs"], None
        return r.status_code, None, f"{body.get('type')}: {body.get('error')}"

    return call


def _program_call(program, adapter, output_names: list[str]):
    """The program run in process as a load call (502 for an answer that does not parse, as served)."""
    import dspy
    from dspy.utils.exceptions import AdapterParseError

    def call(x: dict):
        with dspy.context(adapter=adapter):
            try:
                prediction = program(**x)
            except Exception as exc:
                if isinstance(exc, AdapterParseError) or isinstance(exc.__cause__, AdapterParseError):
                    return 502, None, f"AdapterParseError: {str(exc)[:300]}"
                raise
        return 200, json.loads(_key({n: prediction.get(n) for n in output_names})), None

    return call


def _lm_replica_pids(app: str) -> list[int]:
    """Pids of the alive Serve replica actors of ``app``'s LM deployment (Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:lm"), ("state", "=", "ALIVE")])
    return sorted(a.pid for a in actors if a.pid)


def _kill_one_lm_replica(app: str) -> dict:
    """SIGKILL one LM replica's process from outside; its pid, command line and child pids."""
    import psutil

    pids = _lm_replica_pids(app)
    if len(pids) < 2:
        raise RuntimeError(f"need 2+ alive LM replicas to kill one, found pids {pids}")
    proc = psutil.Process(pids[0])
    cmdline = " ".join(proc.cmdline()).strip()
    if "ServeReplica:" not in cmdline or app not in cmdline:
        raise RuntimeError(f"pid {proc.pid} is not an LM replica of {app!r}: {cmdline[:200]}")
    children = [c.pid for c in proc.children(recursive=True)]
    os.kill(proc.pid, signal.SIGKILL)
    return {"pid": proc.pid, "cmdline": cmdline[:200], "children": children, "alive_before": pids}


def _lm_states(app: str) -> dict[str, int]:
    """Serve's replica states of the LM deployment, e.g. ``{"RUNNING": 2}``."""
    from ray import serve

    states = serve.status().applications[app].deployments["lm"].replica_states
    return {str(getattr(k, "value", k)): n for k, n in states.items()}


def _kill_and_watch(app: str, replicas: int, at_s: float, t0_box: list, deadline_s: float, out: dict) -> None:
    """Thread body: kill one LM replica ``at_s`` after the load starts, then poll Serve until a
    replacement is RUNNING (``replicas`` RUNNING, the killed pid gone); times relative to the load."""
    import psutil

    while not t0_box:
        time.sleep(0.01)
    t0 = t0_box[0]
    time.sleep(max(0.0, t0 + at_s - time.perf_counter()))
    try:
        out.update(_kill_one_lm_replica(app), kill_s=time.perf_counter() - t0, states=[])
    except Exception as exc:  # reported in the fault row's details, the load goes on
        out["error"] = f"{type(exc).__name__}: {exc}"
        return
    while time.perf_counter() - t0 < deadline_s:
        now = time.perf_counter() - t0
        try:
            states, pids = _lm_states(app), _lm_replica_pids(app)
        except Exception as exc:  # the state API can be slow under load: note it, poll again
            out.setdefault("poll_errors", []).append(f"{now:.1f}s {type(exc).__name__}: {str(exc)[:120]}")
            time.sleep(0.5)
            continue
        if not out["states"] or out["states"][-1][1] != states:
            out["states"].append((round(now, 2), states))
        if "noticed_s" not in out and states != {"RUNNING": replicas}:
            out["noticed_s"] = now
        if "noticed_s" in out and states == {"RUNNING": replicas} and out["pid"] not in pids:
            out.update(recovered_s=now, pids_after=pids)
            break
        time.sleep(0.5)
    time.sleep(3)  # children of a SIGKILLed process: gone on their own, or left behind?
    left = []
    for pid in out["children"]:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]}")
        except psutil.Error:
            continue
    out["children_left"] = left


def _fault_run(call, inputs: list[dict], args, app: str) -> dict:
    """The served load with one LM replica killed ``args.kill_lm_replica_at`` seconds in."""
    t0_box: list = []
    kill: dict = {}
    deadline = max(args.seconds, args.kill_lm_replica_at) + args.recovery_timeout
    watcher = threading.Thread(target=_kill_and_watch, daemon=True,
                               args=(app, args.lm_replicas, args.kill_lm_replica_at, t0_box, deadline, kill))
    watcher.start()
    result = _load(call, inputs, args.clients, args.seconds, on_start=t0_box.append)
    watcher.join(timeout=max(1.0, result["t0"] + deadline + 10 - time.perf_counter()))
    result["kill"] = kill
    if "kill_s" not in kill:  # the kill failed (kill["error"] says why)
        return result
    events, kill_s = result["events"], kill["kill_s"]
    rec_s = kill.get("recovered_s", math.inf)
    windows = {"before_kill": (0, kill_s), "kill_to_recovered": (kill_s, rec_s),
               "after_recovered": (rec_s, result["wall_s"])}
    kill["windows"] = {name: _stats([e for e in events if lo <= e[1] < hi], min(hi, result["wall_s"]) - lo)
                       for name, (lo, hi) in windows.items() if lo < result["wall_s"]}
    bad = [(e[1] - kill_s, e[2]) for e in events if e[2] not in ("200", "502")]
    buckets: dict[str, int] = {}  # "<whole seconds after the kill> <status>" -> errors ending then
    for t, status in bad:
        buckets[f"{math.floor(t):+d}s {status}"] = buckets.get(f"{math.floor(t):+d}s {status}", 0) + 1
    kill["errors_after_kill"] = buckets
    kill["error_span_s"] = (round(min(t for t, _ in bad), 2), round(max(t for t, _ in bad), 2)) if bad else None
    kill["recovery_s"] = rec_s - kill_s if rec_s < math.inf else None
    return result


def _served(args, inputs: list[dict], phases: list[str]) -> dict:
    """Start Serve on the run, run the served phases over HTTP, stop Serve."""
    import httpx

    from serve.app import ServeConfig, start, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(run_dir=args.run_dir, port=port, lm_cpus=args.lm_cpus, lm_replicas=args.lm_replicas,
                      lm_max_replicas=args.lm_replicas)
    out = {}
    started = time.perf_counter()
    start(cfg)
    print(f"Serve up with {args.lm_replicas} LM replica(s) in {time.perf_counter() - started:.0f} s", flush=True)
    try:
        with httpx.Client(base_url=cfg.url, timeout=600,
                          limits=httpx.Limits(max_connections=args.clients)) as client:
            call = _http_call(client)
            call(inputs[0])  # warm
            if "served" in phases:
                out["served"] = _load(call, inputs, args.clients, args.seconds)
                print(f"served: {_brief(out['served'])}", flush=True)
            if "fault" in phases:
                out["fault"] = _fault_run(call, inputs, args, cfg.app_name)
                print(f"fault: {_brief(out['fault'])}", flush=True)
    finally:
        stop(cfg)
    return out


def _in_process(args, winner, inputs: list[dict], need: set[int], run_load: bool) -> dict:
    """The in-process load (if ``run_load``), then in-process answers for ``need`` inputs it did not reach."""
    from actors import PoolConfig, ReplicaConfig, ReplicaPool
    from actors.dspy_side.provider import pool_lm
    from engine.adapters.registry import make_adapter, stop_for
    from serve.winner import build_program, interface

    replica = ReplicaConfig(model=winner.base_model, num_cpus=args.lm_cpus, max_model_len=winner.max_model_len,
                            max_lora_rank=winner.max_lora_rank,
                            engine_kwargs=dict(winner.settings.get("engine_kwargs") or {}))
    pool = ReplicaPool(PoolConfig(replica=replica, num_replicas=args.lm_replicas, name="bench-serve"))
    with pool.launch():
        for name, path in winner.adapters.items():
            pool.load_adapter(name, path)
        program = build_program(winner)
        for name, pred in program.named_predictors():  # as serve.deployments.ProgramServer sets them
            pred.lm = pool_lm(pool, winner.models.get(name, winner.base_model), max_tokens=winner.max_tokens,
                              temperature=0.0, stop=stop_for(winner.adapter), cache=False)
        call = _program_call(program, make_adapter(winner.adapter), [f.name for f in interface(program)[1]])
        call(inputs[0])
        local = _load(call, inputs, args.clients, args.seconds) if run_load else {"answers": {}}
        missing = sorted(need - set(local["answers"]))
        with ThreadPoolExecutor(args.clients) as ex:
            for i, (status, outputs, _) in zip(missing, ex.map(lambda i: call(inputs[i]), missing)):
                local["answers"].setdefault(i, set()).add(_key(outputs) if status == 200 else NO_PARSE)
    if run_load:
        print(f"in process: {_brief(local)}", flush=True)
    return local


def _compare(phase: dict, local: dict) -> dict:
    """Per input: does every answer a phase gave equal the single in-process answer?"""
    same, diffs = 0, []
    for i, answers in sorted(phase["answers"].items()):
        ref = local["answers"].get(i, set())
        if len(ref) == 1 and answers == ref:
            same += 1
        else:
            diffs.append({"input": i, "phase": sorted(answers), "in_process": sorted(ref)})
    return {"inputs": same + len(diffs), "same": same, "differ": len(diffs), "diffs": diffs[:10]}


def _brief(r: dict) -> dict:
    return {k: r[k] for k in ("requests", "rps", "p50_s", "p99_s", "statuses", "errors", "error_samples")}


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _report(args, results: dict, compare: dict) -> None:
    """The table (one row per phase), then the fault run's details."""
    print("\n| path | LM replicas | clients | requests | req/s | p50 s | p99 s | 200 | 502 (no parse) | errors "
          "| answers = in process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for phase, r in results.items():
        label = LABELS[phase] + (f" at {args.kill_lm_replica_at:g} s" if phase == "fault" else "")
        c = compare.get(phase)
        same = f"{c['same']}/{c['inputs']} inputs" if c else "(reference)"
        print(f"| {label} | {args.lm_replicas} | {args.clients} | {r['requests']} | {r['rps']:.2f} "
              f"| {_fmt(r['p50_s'])} | {_fmt(r['p99_s'])} | {r['statuses'].get('200', 0)} "
              f"| {r['statuses'].get('502', 0)} | {r['errors']} | {same} |")
    if "served" in results and "local" in results:
        print(f"\nserved / in-process throughput = {results['served']['rps'] / results['local']['rps']:.2f}")
    if "fault" in results:
        k = results["fault"]["kill"]
        print(f"\nfault: killed pid {k.get('pid')} at {_fmt(k.get('kill_s'), '.1f')} s; Serve noticed at "
              f"{_fmt(k.get('noticed_s'), '.1f')} s; replacement RUNNING at {_fmt(k.get('recovered_s'), '.1f')} s "
              f"(recovery {_fmt(k.get('recovery_s'), '.1f')} s); states {k.get('states')}; "
              f"children left alive {k.get('children_left')}" + (f"; {k['error']}" if "error" in k else ""))
        for name, w in k.get("windows", {}).items():
            print(f"  {name}: {w['requests']} requests, {w['rps']:.2f} req/s, statuses {w['statuses']}")
        fault = results["fault"]
        errors = {s: n for s, n in fault["statuses"].items() if s not in ("200", "502")}
        print(f"  errors by status: {errors}; messages {fault['error_samples']}")
        print(f"  errors by second after the kill: {k.get('errors_after_kill')}; first/last error "
              f"{k.get('error_span_s')} s after the kill")


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="benchmarks/out/e2e-run", help="a finished run dir")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60, help="load seconds of each phase")
    ap.add_argument("--lm-replicas", type=int, default=None, help="LM replicas (default 1; 2 with a fault)")
    ap.add_argument("--lm-cpus", type=float, default=None, help="cores per LM replica (default 2 / replicas)")
    ap.add_argument("--kill-lm-replica-at", type=float, default=None, metavar="S",
                    help="add the fault phase: SIGKILL one LM replica S seconds into its load")
    ap.add_argument("--recovery-timeout", type=float, default=120, help="seconds to wait for a replacement")
    ap.add_argument("--phases", default=None, help="comma list of served,fault,local (default served,local "
                    "+ fault with --kill-lm-replica-at)")
    ap.add_argument("--out", default="benchmarks/out/serve_load.json")
    args = ap.parse_args()
    phases = (args.phases or "served,local").split(",")
    if args.kill_lm_replica_at is not None and "fault" not in phases:
        phases.append("fault")
    if set(phases) - set(LABELS) or ("fault" in phases and args.kill_lm_replica_at is None):
        ap.error(f"--phases: served, fault, local (fault needs --kill-lm-replica-at); got {phases}")
    args.phases = [p for p in LABELS if p in phases]
    args.lm_replicas = args.lm_replicas or (2 if "fault" in phases else 1)
    if "fault" in phases and args.lm_replicas < 2:
        ap.error("the fault phase needs --lm-replicas >= 2 (one keeps serving while the other restarts)")
    args.lm_cpus = args.lm_cpus or 2.0 / args.lm_replicas
    return args


def main() -> None:
    args = _parse_args()
    from actors import connect
    from programs import iris
    from serve.winner import load_winner

    winner = load_winner(args.run_dir)
    inputs = [ex.inputs().toDict() for ex in iris.load_splits(0).test]
    connect(num_cpus=max(2, math.ceil(args.lm_cpus * args.lm_replicas)))
    results = _served(args, inputs, args.phases)
    need = {i for r in results.values() for i in r["answers"]}
    local = _in_process(args, winner, inputs, need, "local" in args.phases)
    if "local" in args.phases:
        results["local"] = local
    compare = {p: _compare(r, local) for p, r in results.items() if p != "local"}
    _report(args, results, compare)
    for r in results.values():
        r["answers"] = {i: sorted(a) for i, a in sorted(r["answers"].items())}
        r.pop("t0", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "serve_load", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
        "cpus": os.cpu_count(), "args": vars(args), "model": winner.model, **results,
        "answers_equal_in_process": compare,
        "ratio": results["served"]["rps"] / local["rps"] if {"served", "local"} <= set(results) else None},
        indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
