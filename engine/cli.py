"""The ``tandem`` command line: ``models`` (list / pull / verify), ``run``, ``plan``, ``table`` and ``serve``.

Knows argument parsing, logging setup and turning failures into one clear last line and a
non-zero exit. The flags of ``run``/``plan``/``table`` are made from ``RunConfig``'s fields (name,
type, ``help``/``choices`` metadata, default): ``--max-tokens``; a section's ``--lora-lr`` or
``--lora.lr``; a bool ``--tracking/--no-tracking``; a mapping ``--program-arg KEY=VALUE``; their values
are typed by RunConfig's validation, as YAML values are (a bad one: exit 1, the key named). ``run`` is BetterTogether end to end (``engine.run``); with no arguments it is the
embedded default: Iris, SmolLM2-135M on vLLM-CPU, local Ray, ``p -> w -> p``. ``serve`` publishes
a finished run dir with Ray Serve until Ctrl-C (``serve.app``). Does not know vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

# The CLI connects to Ray explicitly; a Ray call from a thread left over after a stop must fail,
# not start a second local Ray (read when ray is first imported).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

from engine import console
from engine import strategy as strategies

ONE_RUN = ("strategy", "run_dir", "seed")  # RunConfig fields ``table`` sets per cell: no flags there

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
    """The RunConfig of ``run``/``plan``/``table``: the YAML file (or the defaults), then the flags given.

    Flag values go through RunConfig's own validation, as YAML values do (``--lora-lr 1e-5`` is a
    float; ``--replicas two`` is a ``ValueError`` naming ``replicas``).
    """
    from engine.config import RunConfig, load_yaml

    cfg = load_yaml(args.config) if args.config else RunConfig()
    changes = {}
    for f in dataclasses.fields(RunConfig):
        current = getattr(cfg, f.name)
        if dataclasses.is_dataclass(current):  # a section: its flags over its YAML values
            values = {g.name: getattr(current, g.name) for g in dataclasses.fields(current)}
            given = {k: getattr(args, f"{f.name}__{k}", None) for k in values}
            given = {k: {**(values[k] or {}), **_pairs(v)} if _kind(type(current), k) is dict else v
                     for k, v in given.items() if v is not None}
            if given:
                changes[f.name] = {**values, **given}  # validated as a whole: errors say ``lora.lr``
            continue
        value = getattr(args, _dest(RunConfig, f.name), None)
        if value is not None:
            changes[f.name] = {**(current or {}), **_pairs(value)} if _kind(RunConfig, f.name) is dict else value
    return cfg.with_overrides(**changes)


def _dest(cls: type, name: str) -> str:
    """A field's flag, as an argparse dest: its ``flag`` metadata, else its name, or for a mapping the
    singular (``program_args`` -> ``program_arg``: ``--program-arg KEY=VALUE``, repeatable)."""
    flag = cls.__dataclass_fields__[name].metadata.get("flag")
    return flag or (name.removesuffix("s") if _kind(cls, name) is dict else name)


def _kind(cls: type, name: str) -> type | None:
    """A config field's type, plain: ``int`` -> int, ``str | None`` -> str, ``tuple[str, ...]`` -> tuple."""
    import types
    import typing

    from actors.typed_config import field_type

    annotation = field_type(cls, name)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return typing.get_origin(annotation) or annotation


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
    from actors.dspy_side.usage import Costs
    from engine.run import run
    from engine.store.run_store import RunStore

    cfg = _run_config(args)
    logger.info("run: %s on %s, strategy '%s', run dir %s", cfg.program, cfg.model, cfg.strategy, cfg.run_dir)
    outcome = run(cfg)
    spent = {r.strategy: Costs.from_dict(r.extra["costs"]).describe()
             for r in RunStore(outcome.run_dir).steps() if r.extra.get("costs")}
    rows = []
    for s, v in sorted(outcome.scores.items(), key=lambda kv: len(kv[0])):
        test = outcome.test.get(s)
        rows.append((s or "(baseline)", "-" if v is None else f"{v:.1f}", "-" if test is None else f"{test.score:.1f}",
                     "" if test is None else test.describe(), spent.get(s, ""),
                     "best" if s == outcome.best_strategy else ""))
    n = next(iter(outcome.test.values())).n if outcome.test else 0
    console.echo(_text_table(("strategy", "valset score %", f"test score % (n={n})" if n else "test score % (not scored)",
                              "test answers", "step spent", ""), rows))
    console.echo(f"run dir: {outcome.run_dir} (report.md, scores.png, program.json); wall {outcome.wall_s:.0f}s")
    if outcome.failed:
        logger.error("%s; the best program before it ('%s') was kept; the same command resumes from the failed step",
                     console.first_line(outcome.error) or "a step failed", outcome.best_strategy or "baseline")
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
    from engine.table.config import TableConfig
    from engine.table.runner import run_table
    from engine.table.report import write_table

    run_cfg = _run_config(args)
    names = tuple(s.strip() for s in args.strategies.split(",")) if args.strategies else strategies.PAPER
    out = _table_out(args, run_cfg)
    cfg = TableConfig(run=run_cfg, strategies=names, seeds=args.seeds, out_dir=out,
                      test_size=max(0, run_cfg.test_size))
    logger.info("table: %s on %s, %d strategies x seeds %s into %s", run_cfg.program, run_cfg.model,
                len(names), list(args.seeds), out)
    cells = run_table(cfg)
    title = f"{run_cfg.program} on {run_cfg.model} ({len(cfg.seeds)} seeds)"
    paths = write_table(cells, out, title, {"run": vars(run_cfg), "strategies": list(names),
                                            "seeds": list(cfg.seeds)})
    console.echo(paths["md"].read_text())
    console.echo(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _table_out(args: argparse.Namespace, run_cfg) -> str:
    return args.out or f"runs/table-{run_cfg.program.replace(':', '-').replace('.', '-')}"


def _serve(args: argparse.Namespace) -> int:
    import time

    from actors import connect
    from serve.app import ServeConfig, start, stop

    cfg = ServeConfig(run_dir=args.run_dir, step=args.step, host=args.host, port=args.port, token=args.token,
                      lm_replicas=args.lm_replicas, lm_max_replicas=args.lm_max_replicas or args.lm_replicas,
                      lm_cpus=args.lm_cpus, lm_gpus=args.lm_gpus, drain_grace_s=args.drain_grace_s,
                      request_timeout_s=args.request_timeout_s, max_queued_requests=args.max_queued_requests,
                      allow_programs=tuple(args.allow_program or ()), open_without_token=args.open_without_token)
    connect(args.address)
    try:  # from the start: the app answers before serve.run returns, so a stop then must drain it too
        start(cfg)
        console.echo(f"serving {cfg.run_dir} at {cfg.url}  (docs: {cfg.url}/docs; Ctrl-C stops)\n"
                     f"  curl -s {cfg.url}/v1/program\n"
                     f"  curl -s -X POST {cfg.url}/v1/predict -H 'content-type: application/json' -d '{{...inputs...}}'")
        while not args.once:
            time.sleep(3600)
    finally:  # --once, Ctrl-C or SIGTERM: drain (new requests 503, those in flight finish), then exit 0 / 130 / 143
        logger.info("stopping the server: new requests get 503, those in flight get up to %.0f s", cfg.drain_grace_s)
        stop(cfg)
    return 0


def _text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _add_run_flags(r: argparse.ArgumentParser, one_run: bool = True) -> None:
    """One flag per RunConfig field, made from the field (name, type, ``help`` and ``choices`` metadata,
    default); one per field of each nested section too. ``table`` takes them but ``ONE_RUN``'s."""
    from engine.config import RunConfig

    defaults = RunConfig()
    r.add_argument("--config", metavar="YAML", help="YAML RunConfig; the flags below override it")
    top = r.add_argument_group("run settings (YAML top-level keys)")
    for f in dataclasses.fields(RunConfig):
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            _add_section_flags(r, f.name, default)
        elif one_run or f.name not in ONE_RUN:
            dest = _dest(RunConfig, f.name)
            _add_flag(top, RunConfig, f, default, f"--{dest.replace('_', '-')}", dest)


def _add_section_flags(r: argparse.ArgumentParser, section: str, defaults) -> None:
    """One flag per field of a nested config: ``--lora-cpus-per-worker``, or ``--lora.cpus_per_worker``
    (not in the help), = YAML ``lora: cpus_per_worker``."""
    group = r.add_argument_group(f"{section} (YAML section '{section}:'; also --{section}.FIELD_NAME)")
    for f in dataclasses.fields(defaults):
        dest = f"{section}__{f.name}"
        _add_flag(group, type(defaults), f, getattr(defaults, f.name), f"--{section}-{f.name.replace('_', '-')}", dest)
        _add_flag(group, type(defaults), f, getattr(defaults, f.name), f"--{section}.{f.name}", dest, hidden=True)


def _add_flag(group, cls: type, f: dataclasses.Field, default, name: str, dest: str, hidden: bool = False) -> None:
    """A flag for one config field, by its type: a bool is ``--x/--no-x``, a mapping ``KEY=VALUE``
    (repeatable), a tuple ``A,B``; other values are passed on as given, for the config's validation
    to type (as a YAML value is)."""
    kind = _kind(cls, f.name)
    text = f.metadata.get("help", "")
    shown = _shown(default)
    text = f"{text} (default {shown})" if shown else text
    if kind is bool:
        extra: dict = {"action": argparse.BooleanOptionalAction}
    elif kind is dict:
        extra = {"action": "append", "metavar": "KEY=VALUE"}
        text += "; KEY=VALUE, repeatable, values read as YAML"
    elif kind is tuple:
        extra = {"type": _comma_tuple, "metavar": "A,B"}
    else:
        extra = {"metavar": {int: "INT", float: "NUMBER"}.get(kind, "TEXT")}
    if "choices" in f.metadata:
        extra["choices"] = tuple(f.metadata["choices"])
        extra.pop("metavar", None)
    group.add_argument(name, dest=dest, default=None, help=argparse.SUPPRESS if hidden else text.replace("%", "%%"),
                       **extra)


def _shown(default) -> str:
    """A default as the help shows it (YAML spelling); '' for none."""
    if default is None or default == {}:
        return ""
    if isinstance(default, bool):
        return str(default).lower()
    return ",".join(default) if isinstance(default, tuple) else str(default)


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
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print everything here (Ray, vLLM, DSPy, Serve logs) with debug logging; by default "
                        "run/table/serve print a short log and write everything to RUN_DIR/logs/")
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

    v = sub.add_parser("serve", help="publish a run's winning program over HTTP with Ray Serve",
                       description="Publish a run's winning program over HTTP with Ray Serve until SIGTERM or "
                                   "Ctrl-C, which drain it (new requests get 503 + Retry-After, those in flight "
                                   "finish, at most --drain-grace-s seconds) and exit 143 / 130.")
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
    v.add_argument("--drain-grace-s", type=float, default=25.0,
                   help="on SIGTERM / Ctrl-C, seconds the requests in flight get to finish (default 25; keep it "
                        "below your platform's grace, Kubernetes' is 30)")
    v.add_argument("--request-timeout-s", type=float, default=300.0,
                   help="seconds a request may take, then 504; an LM replica with requests in flight and none "
                        "finished for this long fails its health check and is replaced (default 300)")
    v.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting beyond the 64 in flight; more get 503 + Retry-After (default 256)")
    v.add_argument("--allow-program", action="append", metavar="MODULE",
                   help="serve a run whose program comes from MODULE (a package allows its modules), not from "
                        "programs/: serving imports and runs it; repeatable")
    v.add_argument("--open-without-token", action="store_true",
                   help="allow a --host beyond loopback without --token / $TANDEM_SERVE_TOKEN (refused otherwise)")
    v.add_argument("--once", action="store_true", help="deploy, print the URL, and stop (a deploy check)")
    v.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 failed (the last line says why), 2 ``run`` kept the best program
    before a failed step, 130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM."""
    from actors.runtime import stop_of, stop_on_signals

    args = build_parser().parse_args(argv)
    if args.command in ("run", "table"):
        _load_torch_first()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_on_signals()
    log_file = None if args.verbose else _log_file(args)
    with console.quiet(log_file) if log_file else contextlib.nullcontext():
        where = f" (full log: {log_file})" if log_file else ""
        try:
            if log_file:
                logger.info("full log: %s (-v prints it here)", log_file)
            return args.func(args)
        except KeyboardInterrupt as exc:
            stop = stop_of(exc)
            logger.error("tandem %s stopped (%s); what was started is shut down%s", args.command, stop, where)
            return stop.exit_code
        except Exception as exc:
            logger.debug("failure", exc_info=True)
            logger.error("tandem %s failed: %s: %s%s", args.command, type(exc).__name__, exc, where)
            return 1
        finally:
            _shutdown_ray()


def _load_torch_first() -> None:
    """Import torch (the weight step's, through Ray Train) before dspy and pyarrow are imported. In a
    ``ray job`` on a cluster of two Ray nodes on one machine, ``import torch`` after ``import
    pyarrow.parquet`` (or dspy) killed the driver with "Intel oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so"; imported first, it loads (tests/integration/cluster/test_job_submit.py)."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401


def _log_file(args: argparse.Namespace) -> Path | None:
    """Where the quiet console of ``run`` / ``table`` / ``serve`` writes everything (None: no quiet console;
    also when the config does not load: the command then fails with that error on the terminal)."""
    try:
        if args.command == "run":
            from engine.store.lock import live_holder

            run_dir = Path(_run_config(args).run_dir)  # held by another run: refused, and writes nothing there
            return None if live_holder(run_dir) else run_dir / "logs" / "tandem.log"
        if args.command == "table":
            return Path(_table_out(args, _run_config(args))) / "logs" / "tandem.log"
    except Exception:
        return None
    if args.command == "serve":
        return Path(args.run_dir) / "logs" / "serve.log"
    return None


def _shutdown_ray() -> None:
    """Disconnect (and stop a local Ray) before the interpreter exits, in order."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
