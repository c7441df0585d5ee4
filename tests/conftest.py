"""Test-session isolation, applied before any test module imports DSPy or builds a model.

- DSPy's disk cache goes to a fresh temporary dir (``DSPY_CACHEDIR``): no answer ever comes from an
  earlier session's cache; subprocesses (CLI runs) inherit it.
- Models are materialized under the checkout (``.tandem/test-models``, git-ignored), not into the
  user's cache (``~/.cache/tandem/models``), unless ``TANDEM_MODEL_CACHE`` is set already.
- MLflow (the runs' tracking) sends no telemetry and writes nothing under the user's home; every
  run's store is a sqlite file beside its run dir, in the test's temp dir.
"""

import os
import tempfile
from pathlib import Path

os.environ["DSPY_CACHEDIR"] = tempfile.mkdtemp(prefix="tandem-test-dspy-cache-")
os.environ.setdefault("TANDEM_MODEL_CACHE", str(Path(__file__).resolve().parents[1] / ".tandem" / "test-models"))
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
