"""``tandem table``: every strategy x seed, scored on the held-out test split.

Modules: ``config`` (``TableConfig``, ``Cell``, the run order), ``runner`` (``run_table``: runs the
cells on one pool through ``engine.run``), ``report`` (the table's files). Only the config names are
re-exported here, so that tracking can read cells without importing the runner.
"""

from engine.table.config import Cell, TableConfig

__all__ = ["Cell", "TableConfig"]
