"""The winning program of a run dir, as the server needs it: program, model ids, adapters, settings.

Knows the run dir's finished-run files (``best.json``, ``program.json``, ``run.json``; or one step's
``step.json`` + ``program.json`` when a step other than the winner is served) and how to
rebuild the program from them: the program's factory (``programs/<name>.py`` or a dotted module)
plus the saved JSON state through ``engine.store.program_io``'s validating loader — never a pickle.
The files are read through ``engine.store.run_store`` (paths relative to the run dir, so a moved or
copied run dir serves). Also derives the program's HTTP interface (input fields of its first
predictor, output fields of its last) from the signatures. Does not know Ray or HTTP.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import dspy

from engine.store.run_store import RunDirError, RunStore


@dataclass(frozen=True)
class Field:
    """One input or output field of the served program."""

    name: str
    annotation: object
    desc: str


@dataclass(frozen=True)
class Winner:
    """What a finished run dir says about its best program."""

    run_dir: Path
    program: str
    base_model: str
    strategy: str
    score: float | None
    models: dict[str, str]  # predictor -> model id (base or adapter)
    program_args: dict  # keyword arguments of the program's factory (e.g. its retriever)
    adapters: dict[str, str]  # adapter id -> local path
    max_tokens: int
    max_model_len: int
    version: str  # sha256 prefix of program.json: changes whenever the served program does
    program_file: Path
    settings: dict = field(default_factory=dict)  # the run's run.json: engine settings the LM was optimized with
    test: dict | None = None  # the program on the held-out test split (``engine.held_out``), if scored

    @property
    def max_lora_rank(self) -> int:
        """The largest LoRA rank among the adapters (at least 8): what the LM engine must allow."""
        ranks = [json.loads((Path(p) / "adapter_config.json").read_text()).get("r", 8) for p in self.adapters.values()]
        return max([8, *ranks])

    @property
    def adapter(self) -> str:
        """The DSPy adapter the run optimized with (``engine.adapters.registry``; runs before it was a setting: chat)."""
        return self.settings.get("adapter", "chat")

    @property
    def model(self) -> str:
        """The model id the program's predictors use (the adapter when fine-tuned)."""
        return next(iter(self.models.values()), self.base_model)


def load_winner(run_dir: str | Path, step: str | None = None) -> Winner:
    """Read a finished run dir: its winner, or the program of one completed ``step`` (e.g. ``02_w``).

    Raises:
        RunDirError: no such dir or step, no ``best.json``/``program.json`` (the run did not
            finish), or an adapter the program uses is missing.
    """
    root = Path(run_dir).resolve()
    if not root.is_dir():
        raise RunDirError(f"run dir {root} does not exist")
    for name in ("best.json", "program.json", "run.json"):
        if not (root / name).is_file():
            raise RunDirError(f"{root} has no {name}: not a finished run (run `tandem run --run-dir {run_dir}`)")
    store = RunStore(root)
    best, settings = store.best(), store.settings()
    program_file = root / "program.json"
    strategy, score, models, recorded = best.strategy, best.score, best.models, best.adapters
    test = next((r.test for r in store.steps() if r.strategy == best.strategy), None)
    if step is not None:
        record = store.step(step)
        if record is None:
            raise RunDirError(f"{root} has no completed step {step!r}; completed: {[r.name for r in store.steps()]}")
        program_file = record.path / "program.json"
        strategy, score, models, test = record.strategy, record.score, record.models, record.test
        recorded = {a.name: a.path for a in record.adapters}
    adapters = {}
    for model in set(models.values()) - {best.base_model}:
        path = recorded.get(model)
        if path is None or not (path / "adapter_config.json").is_file():
            raise RunDirError(f"the program uses adapter {model!r} but {path or 'the run dir'} does not hold it "
                              f"(adapters present: {sorted(p.name for p in store.adapters.glob('*'))})")
        if not path.resolve().is_relative_to(root):
            raise RunDirError(f"the program's adapter {model!r} is recorded at {path}, outside the run dir {root}; "
                              "only adapters inside the run dir are served")
        adapters[model] = str(path)
    return Winner(root, best.program, best.base_model, strategy, score, dict(models), dict(best.program_args),
                  adapters, int(settings.get("max_tokens", 512)), int(settings.get("max_model_len", 2048)),
                  hashlib.sha256(program_file.read_bytes()).hexdigest()[:12], program_file, settings, test)


def check_allowed(program: str, allowed: tuple[str, ...] | list[str] = ()) -> None:
    """Serving imports and runs the module ``best.json`` names: a built-in program (``programs/``) or one
    whose module (or a parent package) the operator allowed.

    Raises:
        RunDirError: another module, named with the setting that allows it.
    """
    import importlib.util

    module = program.partition(":")[0]
    if module.startswith("programs."):
        module_builtin = True
    else:
        try:
            module_builtin = "." not in module and importlib.util.find_spec(f"programs.{module}") is not None
        except (ImportError, ValueError):
            module_builtin = False
    if module_builtin or any(module == a or module.startswith(f"{a}.") for a in allowed):
        return
    raise RunDirError(f"best.json names the program {program!r}; serving imports and runs the module {module!r}, "
                      f"which is not a built-in program: allow it with --allow-program {module} "
                      f"(allow_programs: [{module}]) if you trust it")


def build_program(winner: Winner) -> dspy.Module:
    """A fresh instance of the run's program with the winning state loaded (predictors without LMs)."""
    from engine.store.program_io import load_program
    from programs.base import resolve

    program = resolve(winner.program).program(**winner.program_args)
    return load_program(program, winner.program_file)


def interface(program: dspy.Module) -> tuple[list[Field], list[Field]]:
    """The program's inputs and outputs.

    Inputs: the named parameters of the program's own ``forward`` (a multi-hop program takes a
    ``question`` while its first predictor also takes the ``context`` it builds), or the first
    predictor's input fields when ``forward`` takes only ``**kwargs`` (``dspy.Predict``,
    ``dspy.ChainOfThought``). Outputs: the last predictor's output fields.
    """
    preds = [pred for _, pred in program.named_predictors()]
    if not preds:
        raise RunDirError("the program has no predictors")

    def fields(sig_fields: dict) -> list[Field]:
        return [Field(name, f.annotation, (f.json_schema_extra or {}).get("desc", "")) for name, f in sig_fields.items()]

    first = fields(preds[0].signature.input_fields)
    params = [p for p in inspect.signature(program.forward).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if params:
        known = {f.name: f for f in first}
        first = [known.get(p.name, Field(p.name, p.annotation if p.annotation is not p.empty else str, ""))
                 for p in params]
    return first, fields(preds[-1].signature.output_fields)
