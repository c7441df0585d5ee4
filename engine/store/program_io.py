"""Saving and loading programs as JSON in dspy's format, through a validating loader.

Knows: a saved program never carries an LM (endpoints and engines are set by the driver, from
the run's records), and a loaded file may set only the keys dspy's ``Predict`` state has —
``Predict.load_state`` would otherwise set any key as an attribute, so a crafted file could
point an LM at another server. Never pickles. Does not know Ray or the run layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import dspy

from engine.store.files import atomic_write

_PREDICT_KEYS = {"traces", "train", "demos", "signature", "fields", "lm"}
_SIGNATURE_KEYS = {"instructions", "fields"}


class ProgramFileError(ValueError):
    """A program JSON file does not match the program or carries fields it must not."""


def program_state(program: dspy.Module) -> dict:
    """The program's dspy JSON state with every predictor's LM removed."""
    preds = program.predictors()
    lms = [pred.lm for pred in preds]
    try:
        for pred in preds:
            pred.lm = None  # the driver sets LMs from the run's records; files never carry one
        return program.dump_state(json_mode=True)
    finally:
        for pred, lm in zip(preds, lms):
            pred.lm = lm


def save_program(program: dspy.Module, path: str | Path) -> None:
    """Write the program's state (no LM) as JSON, whole or not at all (fsynced)."""
    atomic_write(path, json.dumps(program_state(program), indent=2, default=str))


def validate_state(program: dspy.Module, state: dict) -> None:
    """Refuse a state that names unknown predictors, unknown keys, or carries an LM.

    Raises:
        ProgramFileError: with the offending predictor and key named.
    """
    if not isinstance(state, dict):
        raise ProgramFileError("program state must be a JSON object")
    if isinstance(program, dspy.Predict):  # a bare predictor saves its own state, not keyed by name
        _check_predictor("self", {k: v for k, v in state.items() if k != "metadata"})
        return
    names = {name for name, _ in program.named_parameters()}
    extra = set(state) - names - {"metadata"}
    if extra:
        raise ProgramFileError(f"program file has predictors {sorted(extra)} this program lacks ({sorted(names)})")
    for name in names:
        if name not in state:
            raise ProgramFileError(f"program file lacks predictor {name!r}")
        _check_predictor(name, state[name])


def _check_predictor(name: str, pred) -> None:
    if not isinstance(pred, dict):
        raise ProgramFileError(f"predictor {name!r}: state must be an object")
    unknown = set(pred) - _PREDICT_KEYS
    if unknown:
        raise ProgramFileError(f"predictor {name!r}: unknown keys {sorted(unknown)}")
    if pred.get("lm") is not None:
        raise ProgramFileError(f"predictor {name!r}: a program file may not carry an LM (endpoint) state")
    sig = pred.get("signature", {})
    if not isinstance(sig, dict) or set(sig) - _SIGNATURE_KEYS:
        raise ProgramFileError(f"predictor {name!r}: signature has unknown keys")
    if not isinstance(pred.get("demos", []), list):
        raise ProgramFileError(f"predictor {name!r}: demos must be a list")


def load_program(program: dspy.Module, path: str | Path) -> dspy.Module:
    """Load a saved state into ``program`` (a fresh instance of the same program) after validation."""
    try:
        state = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ProgramFileError(f"{path} is not valid JSON: {exc}") from exc
    validate_state(program, state)
    state.pop("metadata", None)
    program.load_state(state)
    return program
