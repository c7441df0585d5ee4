"""The run dir: its one typed reader and writer, program JSON, and remote storage.

Modules: ``run_store`` (``RunStore``: steps, records, the winner, resume), ``program_io``
(dspy-format program JSON saved and loaded through a validating loader: never a pickle), ``remote``
(``storage:`` push and pull with fsspec). Imports nothing of the engine; run, report, table, tracking
and serve all read and write through it.
"""

from engine.store.program_io import ProgramFileError, load_program, save_program
from engine.store.run_store import AdapterRef, BestRecord, RunDirError, RunStore, StepRecord

__all__ = ["AdapterRef", "BestRecord", "ProgramFileError", "RunDirError", "RunStore", "StepRecord", "load_program",
           "save_program"]
