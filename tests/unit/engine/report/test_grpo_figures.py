"""A GRPO step's per-update figures reach the report (one paragraph) and MLflow (one point per update)."""

from pathlib import Path

from engine.report.run_report import grpo_line
from engine.report.tracking import _step_metrics
from engine.store.run_store import StepRecord

HISTORY = [{"step": 1, "reward_mean": 0.25, "reward_std": 0.4, "zero_variance_groups": 3, "groups": 4, "kl": 0.0,
            "loss": 0.1, "rollouts_run": 24, "rollouts_per_s": 2.0, "rollout_s": 12.0, "seconds": 6.0, "sync_s": 2.0,
            "model": "m:grpo-01-v1"},
           {"step": 2, "reward_mean": 0.5, "reward_std": 0.5, "zero_variance_groups": 1, "groups": 4, "kl": 0.002,
            "loss": -0.2, "rollouts_run": 24, "rollouts_per_s": 4.0, "rollout_s": 6.0, "seconds": 3.0, "sync_s": 1.0,
            "model": "m:grpo-01-v2"}]
GRPO = {"job": "grpo-01", "start_model": "m", "updates": 2, "adapter": "m:grpo-01-v2", "history": HISTORY,
        "config": {"lr": 1e-4, "target_modules": ["q_proj"]}}


def test_the_report_says_how_the_reward_moved_and_where_the_time_went():
    line = grpo_line("01-g", GRPO)
    assert "2 updates from `m`" in line and "reward mean per update [0.25, 0.5]" in line
    assert "groups without variance [3, 1] of 4" in line and "48 rollouts at 3.0/s" in line
    assert "rollouts 60%, learning 30%, adapter sync 10% (1.50 s per update)" in line
    assert grpo_line("01-g", {"history": []}) == "GRPO in `01-g`: no update recorded."
    assert "stale" not in line  # every update on-policy: nothing to say


def test_the_report_names_the_updates_on_stale_rollouts_and_their_importance_ratio():
    stale = [{**HISTORY[0], "stale": 0, "ratio_dev": 0.0, "clipped": 0.0},
             {**HISTORY[1], "stale": 1, "ratio_dev": 0.0312, "clipped": 0.05}]
    line = grpo_line("01-g", {**GRPO, "history": stale})
    assert "1 update(s) on stale rollouts: |ratio - 1| [0.031], tokens clipped [0.05]" in line


def test_mlflow_gets_one_point_per_update_and_the_settings_once():
    record = StepRecord(1, "g", "g", 40.0, {"self": "m:grpo-01-v2"}, [], {"wall_s": 30.0, "grpo": GRPO}, Path("."))
    metrics = _step_metrics(record)
    assert [(v, s) for k, v, s in metrics if k == "grpo.reward_mean"] == [(0.25, 1), (0.5, 2)]
    assert [(v, s) for k, v, s in metrics if k == "grpo.sync_s"] == [(2.0, 1), (1.0, 2)]
    assert ("grpo.config.lr", 1e-4, 0) in metrics and not any(k == "grpo.history" for k, _, _ in metrics)
    assert not any(k.startswith("grpo.model") for k, _, _ in metrics)  # text is not a metric
