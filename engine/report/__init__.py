"""What a run shows: ``run_report`` (``report.md`` and ``scores.png`` of a run dir) and ``tracking``
(the run dir, or a table's cells, mirrored into MLflow; mlflow imported lazily). Both read the run
dir through ``engine.store``; neither runs anything.
"""

from engine.report.run_report import write_report
from engine.report.tracking import track_run_or_warn, track_table_or_warn

__all__ = ["track_run_or_warn", "track_table_or_warn", "write_report"]
