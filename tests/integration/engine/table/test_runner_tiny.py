"""`tandem table`'s harness on a tiny budget: real Ray, real vLLM-CPU, the tiny random Llama.

The tiny model never follows DSPy's answer format, so every score is 0 and fine-tuning has no
passing traces: the table must still be well formed, show "–" with that reason for ``w`` and
for ``w -> p`` (which is not even started once its prefix failed), continue ``p -> p`` from the
stored steps of ``p`` (copied, not recomputed), and a rerun must resume from the stored cells.
"""

import csv

import pytest

from engine.config import PromptConfig, RunConfig
from engine.table.config import TableConfig
from engine.table.runner import run_table
from engine.table.report import write_table
from tests.integration.conftest import tiny_train_config

pytestmark = pytest.mark.integration


def test_tiny_table(ray_session, tiny_model, tmp_path):
    run = RunConfig(model=tiny_model, replicas=1, cpus_per_replica=1, train_size=6, val_size=3, max_tokens=16,
                    adapter="chat", threads=8, prompt=PromptConfig(num_candidate_programs=1, max_bootstrapped_demos=1,
                                                   max_labeled_demos=2), lora=tiny_train_config())
    cfg = TableConfig(run=run, strategies=("vanilla", "p", "w", "w -> p", "p -> p"), seeds=(0,), out_dir=str(tmp_path / "t"),
                      test_size=4)
    cells = run_table(cfg)
    by = {c.strategy: c for c in cells}
    assert list(by) == ["vanilla", "p", "w", "w -> p", "p -> p"]
    assert by["vanilla"].test_score == 0.0 and by["p"].test_score == 0.0 and by["p"].dev_score == 0.0
    for name in ("w", "w -> p"):
        assert by[name].test_score is None and "no passing traces" in by[name].reason
    # blocked by its failed prefix: never started, only its cell is stored
    assert [p.name for p in (tmp_path / "t" / "seed-0" / "w-p").iterdir()] == ["test.json"]
    assert (tmp_path / "t" / "seed-0" / "p" / "01_p" / "step.json").is_file()
    seed = tmp_path / "t" / "seed-0"
    for step in ("00_baseline", "01_p"):  # p -> p continued p: its first steps are p's, copied byte for byte
        assert (seed / "p-p" / step / "step.json").read_bytes() == (seed / "p" / step / "step.json").read_bytes()
    assert (seed / "p-p" / "02_p" / "step.json").is_file() and by["p -> p"].test_score == 0.0

    paths = write_table(cells, cfg.out_dir, "iris on tiny", {})
    table = paths["md"].read_text()
    assert "| `vanilla` | 0.0 | 0.0 |" in table and "| `w -> p` | – | – [1] |" in table
    assert len(list(csv.DictReader(paths["csv"].open()))) == 5

    again = run_table(cfg)  # every cell is stored: the rerun reads them back
    assert again == cells
