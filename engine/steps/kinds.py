"""Step kinds by name: what a run's ``steps:`` entries and strategy keys can be.

Built-in kinds: ``bfrs`` (``PromptStep``: the paper's prompt step, parallel BFRS), ``finetune``
(``WeightStep``: LoRA on passing traces), ``grpo`` (``GRPOStep``: RL on every rollout's reward), ``gepa``
(``GEPAStep``), ``mipro`` (``MIPROStep``); any ``dspy.Teleprompter`` by import path
(``"package.module:Class"``, built as ``Class(metric, **args)``).
Built-in keys, usable in a strategy without a ``steps:`` section: ``p`` (bfrs), ``w`` (finetune), ``g``
(grpo, the run's ``grpo:`` section; an entry's arguments change its fields), ``gepa`` and ``mipro`` (each
with its own defaults). A ``steps:`` entry is ``{kind: ..., <the kind's
arguments>..., compile_args: {...}}``; ``compile_args`` are the step's ``compile`` arguments (dspy's
``optimizer_compile_args``). Knows the kinds' names and argument checks; does not know pools or runs
(``engine.run`` builds each step with the run's settings: ``StepContext``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("bfrs", "finetune", "grpo", "gepa", "mipro")
DEFAULT_STEPS = {"p": {"kind": "bfrs"}, "w": {"kind": "finetune"}, "g": {"kind": "grpo"}, "gepa": {"kind": "gepa"},
                 "mipro": {"kind": "mipro"}}
MODEL_ARGS = {"bfrs": ("teacher",), "finetune": ("teacher",), "gepa": ("reflection_model",),
              "mipro": ("prompt_model",)}  # a kind's arguments that name a model group (engine.config.ModelGroup)
WEIGHT_KINDS = ("finetune",)  # kinds that train the model with Ray Train (the plan reserves training workers)
RL_KINDS = ("grpo",)  # kinds that train the model beside its live replicas (the plan places a learner with them)


@dataclass(frozen=True)
class StepContext:
    """What every step of a run shares: the metric, the run's thread count and seed, and the run-level
    settings the built-in kinds default to (``prompt``, ``weight``: keyword arguments of PromptStep and
    WeightStep; ``grpo``: GRPOStep's ``GRPOStepConfig``; ``models``: LMs by model-group name for
    ``teacher:`` / ``reflection_model:`` / ``prompt_model:``)."""

    metric: Callable
    threads: int = 32
    seed: int = 0
    prompt: dict = field(default_factory=dict)
    weight: dict = field(default_factory=dict)
    feedback: Callable | None = None
    models: dict = field(default_factory=dict)
    grpo: Any = None
    release: Callable[[str], None] | None = None  # release(name): a model group's use in this step is done


def kind_of(entry: dict) -> str:
    """The kind of a ``steps:`` entry (``ValueError`` naming the valid kinds when it is not one)."""
    kind = entry.get("kind")
    if kind in KINDS or (isinstance(kind, str) and ":" in kind):
        return kind
    raise ValueError(f"step kind must be one of {list(KINDS)} or 'package.module:Class', got {kind!r}")


def resolve_steps(steps: dict[str, dict]) -> dict[str, dict]:
    """The run's step table: ``DEFAULT_STEPS`` updated by ``steps`` (an entry without ``kind`` keeps
    the default key's kind, e.g. ``{gepa: {max_metric_calls: 200}}``); every entry checked."""
    table = {key: dict(entry) for key, entry in DEFAULT_STEPS.items()}
    for key, entry in steps.items():
        if not isinstance(entry, dict):
            raise ValueError(f"steps.{key} must be a mapping such as {{kind: gepa, auto: light}}, got {entry!r}")
        if " " in key or "->" in key or not key:
            raise ValueError(f"step key {key!r} cannot be empty or contain spaces or '->'")
        merged = {**table.get(key, {}), **entry} if "kind" not in entry else dict(entry)
        if "kind" not in merged:
            raise ValueError(f"steps.{key} needs a kind: one of {list(KINDS)} or 'package.module:Class'")
        kind_of(merged)
        if not isinstance(merged.get("compile_args", {}), dict):
            raise ValueError(f"steps.{key}.compile_args must be a mapping")
        table[key] = merged
    return table


def model_refs(entry: dict) -> dict[str, str]:
    """The model groups a step entry names: argument -> group name (``{"teacher": "qwen"}``).

    Raises:
        ValueError: such an argument that is not a model name (a string).
    """
    refs = {arg: entry[arg] for arg in MODEL_ARGS.get(entry["kind"], ()) if entry.get(arg) is not None}
    for arg, name in refs.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{arg} names a model of the run's models:, got {name!r}")
    return refs


def weight_keys(table: dict[str, dict], kinds: tuple[str, ...] = WEIGHT_KINDS) -> set[str]:
    """The keys whose steps train the model (with Ray Train; ``kinds=RL_KINDS``: with a GRPO learner)."""
    return {key for key, entry in table.items() if entry["kind"] in kinds}


def build(key: str, entry: dict, ctx: StepContext):
    """The ``Teleprompter`` of step ``key`` from its entry and the run's context.

    Raises:
        ValueError: an unknown kind, an import path that names no Teleprompter, or a model name not in
            ``ctx.models``.
        TypeError: arguments the kind does not take (named).
    """
    from dspy.teleprompt.teleprompt import Teleprompter

    kind = kind_of(entry)
    args = {k: v for k, v in entry.items() if k not in ("kind", "compile_args")}
    if kind == "bfrs":
        from engine.steps.prompt import PromptStep

        args = _model_arg(args, "teacher", "teacher_lm", ctx, key)
        return PromptStep(ctx.metric, **{"num_threads": ctx.threads, "seed": ctx.seed, **ctx.prompt, **args})
    if kind == "finetune":
        from engine.steps.weight import WeightStep

        if args.get("teacher") is not None and ctx.release is not None:
            args["after_teacher"] = functools.partial(ctx.release, args["teacher"])
        args = _model_arg(args, "teacher", "teacher_lm", ctx, key)
        return WeightStep(ctx.metric, **{"num_threads": ctx.threads, **ctx.weight, **args})
    if kind == "grpo":
        from dataclasses import replace

        from engine.steps.grpo import GRPOStep, GRPOStepConfig

        try:
            cfg = replace(ctx.grpo or GRPOStepConfig(), **args)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"steps.{key}: {exc}") from None
        return GRPOStep(ctx.metric, cfg, num_threads=ctx.threads, seed=ctx.seed)
    if kind == "gepa":
        from engine.steps.gepa import GEPAStep, as_reflection

        args = _model_arg(args, "reflection_model", "reflection_lm", ctx, key)
        if "reflection_lm" in args:
            args["reflection_lm"] = as_reflection(args["reflection_lm"])
        return GEPAStep(ctx.metric, **{"feedback": ctx.feedback, "num_threads": ctx.threads, "seed": ctx.seed,
                                       **args})
    if kind == "mipro":
        from engine.steps.mipro import MIPROStep

        args = _model_arg(args, "prompt_model", "prompt_model", ctx, key)
        return MIPROStep(ctx.metric, **{"num_threads": ctx.threads, "seed": ctx.seed, **args})
    cls = _import(kind)
    if not (inspect.isclass(cls) and issubclass(cls, Teleprompter)):
        raise ValueError(f"steps.{key}: {kind} is not a dspy Teleprompter class")
    return cls(ctx.metric, **args)


def _model_arg(args: dict, name: str, param: str, ctx: StepContext, key: str) -> dict:
    """``reflection_model: <name>`` -> ``reflection_lm=<LM>`` from ``ctx.models`` (absent: the program's LM);
    the same for ``teacher`` -> ``teacher_lm`` and ``prompt_model``."""
    args = dict(args)
    model = args.pop(name, None)
    if model is None:
        return args
    if model not in ctx.models:
        raise ValueError(f"steps.{key}.{name}: no model {model!r} in this run (models: {sorted(ctx.models)})")
    return {**args, param: ctx.models[model]}


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"step kind {path!r}: cannot import {name!r} from {module!r}: {exc}") from None
