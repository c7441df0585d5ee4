"""The run dir: one folder per completed step, written atomically, so a rerun resumes.

Layout::

    RUN_DIR/run.json                 the run's fingerprint (program, model, strategy, settings)
    RUN_DIR/00_baseline/             program.json (dspy JSON, no LM), step.json (score, model ids, …)
    RUN_DIR/01_p/  02_w/  03_p/      the same, plus candidates.json / traces.parquet / train metrics
    RUN_DIR/adapters/<name>/         LoRA adapters (a stable path the replicas load from)
    RUN_DIR/report.md, scores.png    written at the end

A step is built in ``NN_key.tmp/`` and renamed into place after its ``step.json`` is written:
a half-written step is never taken as done. A rerun whose fingerprint differs is refused with
the differing keys named. Does not know DSPy beyond saving programs through ``program_io``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import dspy

from engine.program_io import load_program, save_program


@dataclass(frozen=True)
class StepRecord:
    """What a completed step left: its score, strategy prefix and the model id of each predictor."""

    index: int
    key: str
    strategy: str
    score: float | None
    models: dict[str, str]
    adapters: list[dict]
    extra: dict
    path: Path


class RunStore:
    """One run dir.

    Args:
        root: the run dir (created).
        fingerprint: JSON-able settings that must match for a resume.

    Raises:
        ValueError: the dir holds a run with another fingerprint.
    """

    def __init__(self, root: str | Path, fingerprint: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        fingerprint = json.loads(json.dumps(fingerprint, default=str))  # tuples and lists compare as JSON
        marker = self.root / "run.json"
        if marker.exists():
            old = json.loads(marker.read_text())
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if diff:
                raise ValueError(f"run dir {self.root} holds a run with other settings ({', '.join(diff)}); "
                                 "use a new run dir or the same settings to resume")
        else:
            marker.write_text(json.dumps(fingerprint, indent=2, default=str))
        self.adapters = self.root / "adapters"

    @staticmethod
    def name(index: int, key: str) -> str:
        return f"{index:02d}_{key or 'baseline'}"

    def completed(self, index: int, key: str) -> StepRecord | None:
        """The record of a completed step, or None (a leftover ``.tmp`` dir does not count)."""
        path = self.root / self.name(index, key)
        record = path / "step.json"
        if not record.is_file():
            return None
        data = json.loads(record.read_text())
        return StepRecord(index, key, data["strategy"], data["score"], data["models"], data.get("adapters", []),
                          data.get("extra", {}), path)

    def begin(self, index: int, key: str) -> Path:
        """A clean temp dir for the step's files."""
        tmp = self.root / (self.name(index, key) + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, index: int, key: str, *, program: dspy.Module, strategy: str, score: float | None,
               adapters: list[dict], extra: dict | None = None) -> StepRecord:
        """Write program and record into the temp dir and rename it into place."""
        tmp = self.root / (self.name(index, key) + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_program(program, tmp / "program.json")
        models = {name: pred.lm.model for name, pred in program.named_predictors() if pred.lm is not None}
        record = {"strategy": strategy, "score": score, "models": models, "adapters": adapters, "extra": extra or {}}
        (tmp / "step.json").write_text(json.dumps(record, indent=2, default=str))
        final = self.root / self.name(index, key)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return self.completed(index, key)

    def load(self, record: StepRecord, fresh: dspy.Module) -> dspy.Module:
        """The step's program: ``fresh`` (a new instance of the program) with the saved state."""
        return load_program(fresh, record.path / "program.json")
