"""The ``tandem`` command line: ``models`` (list / pull / verify), ``run``, ``plan``, ``table`` and ``serve``.

Knows argument parsing, logging setup and turning failures into one clear last line and a
non-zero exit. ``run`` is BetterTogether end to end (``engine.run``); with no arguments it is the
embedded default: Iris, SmolLM2-135M on vLLM-CPU, local Ray, ``p -> w -> p``. ``serve`` publishes
a finished run dir with Ray Serve until Ctrl-C (``serve.app``). Does not know vLLM.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

# The CLI connects to Ray explicitly; a Ray call from a thread left over after a stop must fail,
# not start a second local Ray (read when ray is first imported).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from engine import strategy as strategies
from engine.adapters import ADAPTERS

SECTIONS = ("lora", "prompt")  # RunConfig's nested configs: one flag per field each

logger = logging.getLogger("tandem")


def _models(args: argparse.Namespace) -> int:
    from actors import models

    if args.action == "list":
        rows = [(m.name, "yes" if m.materialized else "no", m.description) for m in models.list_models(args.cache)]
        print(_text_table(("model", "materialized", "source"), rows))
        print(f"cache: {models.cache_dir(args.cache)}")
        return 0
    names = args.names or [models.EMBEDDED]
    for name in names:
        if args.action == "pull":
            path = models.materialize(name, args.cache, force=args.force)
        else:
            path = models.verify(name, args.cache)
        print(f"{name}: {path} ({'verified' if args.action == 'verify' else 'ready'})")
    return 0


def _run_config(args: argparse.Namespace):
    """The RunConfig of ``run``/``table``: the YAML file (or the defaults), then the flags."""
    from engine.config import RunConfig, load_yaml

    cfg = load_yaml(args.config) if args.config else RunConfig()
    one_run = {k: getattr(args, k, None) for k in ("strategy", "run_dir", "seed")}
    sections = {}
    for section in SECTIONS:
        changes = {k.split("__", 1)[1]: v for k, v in vars(args).items()
                   if k.startswith(f"{section}__") and v is not None}
        if changes:
            sections[section] = dataclasses.replace(getattr(cfg, section), **changes)
    return cfg.with_overrides(
        **sections,
        **one_run, program=args.program, model=args.model, replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica, train_size=args.train_size,
        val_size=args.val_size, test_size=args.test_size, max_tokens=args.max_tokens, lifecycle=args.lifecycle,
        threads=args.threads, address=args.address, storage=args.storage, exclude_demos=args.exclude_demos,
        w_rounds=args.w_rounds,
        adapter=args.adapter, tracking=args.tracking, tracking_uri=args.tracking_uri,
        program_args={**cfg.program_args, **_pairs(args.program_arg)} if args.program_arg else None,
        data_args={**cfg.data_args, **_pairs(args.data_arg)} if args.data_arg else None)


def _pairs(items: list[str]) -> dict:
    """``KEY=VALUE`` flags as a dict; values read as YAML scalars (``3`` is an int, ``a,b`` a string)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value else ""
    return out


def _run(args: argparse.Namespace) -> int:
    from engine.run import run

    cfg = _run_config(args)
    logger.info("run: %s on %s, strategy '%s', run dir %s", cfg.program, cfg.model, cfg.strategy, cfg.run_dir)
    outcome = run(cfg)
    rows = []
    for s, v in sorted(outcome.scores.items(), key=lambda kv: len(kv[0])):
        test = outcome.test.get(s)
        rows.append((s or "(baseline)", "-" if v is None else f"{v:.1f}", "-" if test is None else f"{test.score:.1f}",
                     "" if test is None else test.describe(), "best" if s == outcome.best_strategy else ""))
    n = next(iter(outcome.test.values())).n if outcome.test else 0
    print(_text_table(("strategy", "valset score %", f"test score % (n={n})", "test answers", ""), rows))
    print(f"run dir: {outcome.run_dir} (report.md, scores.png, program.json); wall {outcome.wall_s:.0f}s")
    if outcome.tracked is not None:
        print(f"tracking: {outcome.tracked.describe()}")
    if outcome.failed:
        logger.error("a step failed; the best program before it was kept (see the log above and report.md)")
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from actors import connect
    from engine.plan import check, describe, make_plan, nodes_now, suggest, warnings

    cfg = _run_config(args)
    connect(cfg.address)
    nodes = nodes_now()
    phases = make_plan(cfg, nodes)
    print(describe(phases, nodes))
    for warning in warnings(cfg):
        print(f"warning: {warning}")
    check(phases, suggest(cfg, nodes))
    print(f"plan ok: {cfg.replicas} replica(s) of {cfg.model}, strategy '{cfg.strategy}', lifecycle {cfg.lifecycle}")
    return 0


def _table(args: argparse.Namespace) -> int:
    from engine.table import TableConfig, run_table
    from engine.table_report import write_table

    run_cfg = _run_config(args)
    names = tuple(s.strip() for s in args.strategies.split(",")) if args.strategies else strategies.PAPER
    out = args.out or f"runs/table-{run_cfg.program.replace(':', '-').replace('.', '-')}"
    cfg = TableConfig(run=run_cfg, strategies=names, seeds=args.seeds, out_dir=out,
                      test_size=max(0, run_cfg.test_size))
    logger.info("table: %s on %s, %d strategies x seeds %s into %s", run_cfg.program, run_cfg.model,
                len(names), list(args.seeds), out)
    cells = run_table(cfg)
    title = f"{run_cfg.program} on {run_cfg.model} ({len(cfg.seeds)} seeds)"
    paths = write_table(cells, out, title, {"run": vars(run_cfg), "strategies": list(names),
                                            "seeds": list(cfg.seeds)})
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import time

    from actors import connect
    from serve.app import ServeConfig, start, stop

    cfg = ServeConfig(run_dir=args.run_dir, step=args.step, host=args.host, port=args.port, token=args.token,
                      lm_replicas=args.lm_replicas, lm_max_replicas=args.lm_max_replicas or args.lm_replicas,
                      lm_cpus=args.lm_cpus, lm_gpus=args.lm_gpus)
    connect(args.address)
    start(cfg)
    print(f"serving {cfg.run_dir} at {cfg.url}  (docs: {cfg.url}/docs; Ctrl-C stops)\n"
          f"  curl -s {cfg.url}/v1/program\n"
          f"  curl -s -X POST {cfg.url}/v1/predict -H 'content-type: application/json' -d '{{...inputs...}}'",
          flush=True)
    if args.once:
        stop(cfg)
        return 0
    try:
        while True:
            time.sleep(3600)
    finally:  # Ctrl-C or SIGTERM: main() turns it into exit code 130 / 143
        logger.info("stopping the server")
        stop(cfg)


def _text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _add_run_flags(r: argparse.ArgumentParser, one_run: bool = True) -> None:
    """The RunConfig flags of ``run``; ``table`` takes them but strategy, run dir and seed."""
    r.add_argument("--config", help="YAML RunConfig; flags below override it")
    r.add_argument("--program", help="iris (default), gsm8k, hotpotqa, or package.module[:Factory]")
    r.add_argument("--model", help="built-in name, HF dir or hub id (default smollm2-135m-instruct)")
    if one_run:
        r.add_argument("--strategy", help="e.g. 'p -> w -> p' (default)")
        r.add_argument("--run-dir", help="run dir; a rerun with the same dir resumes (default runs/iris-smollm2)")
        r.add_argument("--seed", type=int)
    r.add_argument("--replicas", type=int, help="vLLM replicas (default 2)")
    r.add_argument("--cpus-per-replica", type=float)
    r.add_argument("--gpus-per-replica", type=float, help="GPUs per replica (0 = CPU path)")
    r.add_argument("--train-size", type=int, help="training examples (0 = all; default 30)")
    r.add_argument("--val-size", type=int, help="validation examples (0 = all; default 15)")
    r.add_argument("--test-size", type=int, help="held-out test examples every step is scored on (0 = all, the "
                   "default; -1 = none)")
    r.add_argument("--max-tokens", type=int, help="completion tokens per LM call (default 200)")
    r.add_argument("--lifecycle", choices=("relaunch", "hotswap"), help="after fine-tuning (default relaunch)")
    r.add_argument("--adapter", choices=ADAPTERS, help="how prompts are written and answers read: constrained "
                   "(ChatAdapter's layout enforced by the pool: every answer parses; the default), chat (DSPy's "
                   "ChatAdapter) or json (JSONAdapter, decoded under its schema)")
    r.add_argument("--exclude-demos", action=argparse.BooleanOptionalAction, help="weight step: train on vanilla "
                   "prompts and return the program without demos (default, the paper's); --no-exclude-demos "
                   "trains with the program's demos in the prompt and keeps them (dspy's default)")
    r.add_argument("--w-rounds", type=int, help="weight step: runs per training example at most while collecting "
                   "traces; rounds after the first sample at temperature 1.0 (dspy's max_rounds; default 1, the "
                   "paper's single greedy pass)")
    r.add_argument("--threads", type=int, help="concurrent LM calls (default 32)")
    r.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    r.add_argument("--storage", help="copy the run dir here at the end and resume from it (path or s3://, gs:// URI)")
    r.add_argument("--tracking", action=argparse.BooleanOptionalAction, help="log the run to MLflow when it ends "
                   "(default; --no-tracking: off)")
    r.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///<run dir's parent>/mlflow.db, which `mlflow ui --backend-store-uri` opens)")
    r.add_argument("--program-arg", action="append", metavar="KEY=VALUE",
                   help="argument of the program's Program() (repeatable; e.g. retriever=bm25:corpus.jsonl)")
    r.add_argument("--data-arg", action="append", metavar="KEY=VALUE",
                   help="argument of its load_splits() (repeatable; e.g. path=/data/gsm8k)")
    for section in SECTIONS:
        _add_section_flags(r, section)


def _add_section_flags(r: argparse.ArgumentParser, section: str) -> None:
    """One flag per field of a nested config (``--lora-cpus-per-worker`` = YAML ``lora: cpus_per_worker``)."""
    from engine.config import RunConfig

    defaults = getattr(RunConfig(), section)
    group = r.add_argument_group(f"{section} (YAML section '{section}:')")
    for f in dataclasses.fields(defaults):
        kind = str(f.type)
        extra: dict = {"action": argparse.BooleanOptionalAction} if kind == "bool" else {
            "metavar": f.name.upper(),
            "type": _comma_tuple if kind.startswith("tuple") else {"int": int, "float": float}.get(kind, str)}
        default = getattr(defaults, f.name)
        default = ",".join(default) if isinstance(default, tuple) else default
        group.add_argument(f"--{section}-{f.name.replace('_', '-')}", dest=f"{section}__{f.name}", default=None,
                           help=f"{f.metadata.get('help', '')} (default {default})", **extra)


def _seeds(value: str) -> tuple[int, ...]:
    """``3`` -> (0, 1, 2); ``0,1,2`` or ``7,11`` -> those seeds."""
    try:
        if "," not in value:
            count = int(value)
            if count < 1:
                raise argparse.ArgumentTypeError(f"--seeds N needs N >= 1, got {count}")
            return tuple(range(count))
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes N or a comma-separated list of integers, got {value!r}")


def _comma_tuple(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list, pull (materialize) or verify built-in models")
    m.add_argument("action", choices=("list", "pull", "verify"))
    m.add_argument("names", nargs="*", help="built-in model names (default: the embedded default)")
    m.add_argument("--cache", help="model cache dir (default $TANDEM_MODEL_CACHE or ~/.cache/tandem/models)")
    m.add_argument("--force", action="store_true", help="rebuild even if materialized")
    m.set_defaults(func=_models)

    r = sub.add_parser("run", help="optimize a program with BetterTogether (default: Iris on SmolLM2-135M)")
    _add_run_flags(r)
    r.set_defaults(func=_run)

    p = sub.add_parser("plan", help="dry run: print what a run places where; fail if the cluster cannot hold it")
    _add_run_flags(p)
    p.set_defaults(func=_plan)

    t = sub.add_parser("table", help="the paper's table: every strategy x seeds, scored on the test split")
    _add_run_flags(t, one_run=False)
    t.add_argument("--strategies", help="comma-separated, 'vanilla' = no optimization "
                   f"(default: {', '.join(strategies.PAPER)})")
    t.add_argument("--seeds", type=_seeds, default=(0, 1, 2),
                   help="N (seeds 0..N-1) or a comma-separated list, e.g. 3 or 0,1,2 or 7,11 (default 3)")
    t.add_argument("--out", help="output dir (default runs/table-PROGRAM); a rerun resumes")
    t.set_defaults(func=_table)

    v = sub.add_parser("serve", help="publish a run's winning program over HTTP with Ray Serve")
    v.add_argument("run_dir", help="a finished run dir (has best.json and program.json)")
    v.add_argument("--step", help="serve this completed step's program (e.g. 02_w) instead of the winner")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (default $TANDEM_SERVE_TOKEN)")
    v.add_argument("--lm-replicas", type=int, default=1, help="LM replicas (autoscaling minimum)")
    v.add_argument("--lm-max-replicas", type=int, help="autoscaling maximum (default: --lm-replicas)")
    v.add_argument("--lm-cpus", type=float, default=1, help="CPUs per LM replica")
    v.add_argument("--lm-gpus", type=float, help="GPUs per LM replica (default: the run's --gpus-per-replica)")
    v.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    v.add_argument("--once", action="store_true", help="deploy, print the URL, and stop (a deploy check)")
    v.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 failed (the last line says why), 2 ``run`` kept the best program
    before a failed step, 130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM."""
    from actors.runtime import stop_of, stop_on_signals

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_on_signals()
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        stop = stop_of(exc)
        logger.error("tandem %s stopped (%s); what was started is shut down", args.command, stop)
        return stop.exit_code
    except Exception as exc:
        logger.debug("failure", exc_info=True)
        logger.error("tandem %s failed: %s: %s", args.command, type(exc).__name__, exc)
        return 1
    finally:
        _shutdown_ray()


def _shutdown_ray() -> None:
    """Disconnect (and stop a local Ray) before the interpreter exits, in order."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
