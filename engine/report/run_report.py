"""The run report: ``report.md`` with the valset and held-out test score of every strategy
prefix, how varied each program's test answers are, and ``scores.png``.

Knows how to read a run dir's step records and draw them, and when to warn: a valset under
``SMALL_VALSET`` examples, a program that answers one thing to everything, no test split.
matplotlib (Agg) is imported lazily. Does not run anything.
"""

from __future__ import annotations

from pathlib import Path

from actors.dspy_side.usage import Costs
from engine.held_out import HeldOut
from engine.store.run_store import RunStore

SMALL_VALSET = 30  # fewer validation examples than this: a step's valset score is noise-prone


def step_rows(run_dir: str | Path) -> list[dict]:
    """One row per completed step, in order: name, strategy prefix, score, wall time, model ids."""
    return [{"step": r.name, "strategy": r.strategy or "(baseline)", "score": r.score,
             "test": HeldOut.from_dict(r.test) if r.test else None,
             "wall_s": r.extra.get("wall_s"), "models": sorted(set(r.models.values())), "extra": r.extra}
            for r in RunStore(run_dir).steps()]


def write_report(run_dir: str | Path, title: str, best_strategy: str, failed: bool,
                 valset_size: int | None = None) -> Path:
    """Write ``report.md`` and ``scores.png`` into the run dir; return the report path."""
    run_dir = Path(run_dir)
    rows = step_rows(run_dir)
    lines = [f"# {title}", "", f"Best strategy: `{best_strategy or '(baseline)'}`"
             + (" — a step failed; the best program before it was kept." if failed else ""), ""]
    if valset_size is not None and valset_size < SMALL_VALSET:
        lines += [f"**Warning:** the valset has {valset_size} examples (under {SMALL_VALSET}): one answer moves a "
                  f"step's score by {100 / max(1, valset_size):.1f} points, so the winner is picked on noise-prone "
                  "figures. The test column is the evidence.", ""]
    if not any(r["test"] for r in rows):
        lines += ["No held-out test scores (no test split, or `test_size: -1`).", ""]
    lines += ["| step | strategy | valset score % | test score % | test answers | wall s | spent | model |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = "–" if r["score"] is None else f"{r['score']:.1f}"
        test = r["test"]
        held = "–" if test is None else f"{test.score:.1f} (n={test.n})"
        lines.append(f"| {r['step']} | `{r['strategy']}` | {score} | {held} | {test.describe() if test else ''} "
                     f"| {r['wall_s'] or ''} | {_spent(r['extra'])} | {', '.join(r['models'])} |")
    for r in rows:
        if r["test"] and r["test"].one_answer:
            lines += ["", f"**Warning:** `{r['strategy']}` answers {r['test'].top!r} to "
                      f"{r['test'].top_count} of {r['test'].answered} test inputs while the labels vary: its score "
                      "is the share of that one class, not skill."]
    for r in rows:
        extra = r["extra"]
        for t in extra.get("trained", []):
            m = t["train_metrics"]
            lines += ["", f"Fine-tuning in `{r['step']}` (predictors: {t['predictors']}): {extra['rows']} chat rows "
                      f"from {extra['passing_traces']} passing traces of {extra['attempted']} examples"
                      f"{_rounds(extra.get('max_rounds', 1))}; loss per "
                      f"epoch {[round(x, 3) for x in m.get('loss_history', [])]} (lr "
                      f"{[float(f'{x:.2g}') for x in m.get('lr_history', [])]}, grad norm "
                      f"{[round(x, 2) for x in m.get('grad_norm_history', [])]}), {m.get('optimizer_steps')} "
                      f"optimizer steps, {m.get('tokens_per_s', 0):.0f} tokens/s, adapter `{t['adapter']}` "
                      f"({extra['lifecycle']}{', trained on vanilla prompts' if extra.get('exclude_demos') else ''}"
                      f"{', teacher traces' if extra.get('teacher') else ''})."]
        if extra.get("grpo"):
            lines += ["", grpo_line(r["step"], extra["grpo"])]
        errors = extra.get("errors") or {}
        if errors.get("count"):
            lines += ["", f"Errors in `{r['step']}` (below max_errors, each scored 0): {errors['count']} of "
                      f"{errors['runs']} runs; first: {'; '.join(errors['first'][:2])}"]
    store = RunStore(run_dir)
    best = store.best() if (store.root / "best.json").is_file() else None
    if best is not None and best.costs:
        lines += ["", f"Spent by this invocation (steps done in an earlier run not included): "
                  f"{Costs.from_dict(best.costs).describe()}; of that, scoring on the test split: "
                  f"{Costs.from_dict(best.test_costs).describe()}. LM calls count every call a program made, "
                  "cached ones included; tokens only those that reached a replica."]
    lines += ["", "![scores](scores.png)", ""]
    _chart(rows, run_dir / "scores.png")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _chart(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["strategy"] for r in rows]
    scores = [r["score"] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(rows)), 3.2))
    bars = ax.bar(range(len(rows)), scores, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{s:.1f}" for s in scores], padding=2)
    ax.set_xticks(range(len(rows)), labels, rotation=15)
    ax.set_ylabel("valset score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Score after each strategy prefix")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def grpo_line(step: str, grpo: dict) -> str:
    """A GRPO step in one paragraph: updates, reward per update, groups without variance, KL, throughput and
    the time split (rollouts / learn / sync)."""
    h = grpo.get("history") or []
    if not h:
        return f"GRPO in `{step}`: no update recorded."
    total = {k: sum(m.get(k) or 0.0 for m in h) for k in ("rollout_s", "seconds", "sync_s")}
    spent = sum(total.values()) or 1.0
    return (f"GRPO in `{step}` ({len(h)} updates from `{grpo.get('start_model')}`, adapter `{grpo.get('adapter')}`): "
            f"reward mean per update {[round(m['reward_mean'], 2) for m in h]}, groups without variance "
            f"{[m['zero_variance_groups'] for m in h]} of {h[-1]['groups']}, KL {[round(m['kl'], 4) for m in h]}"
            f"{_off_policy(h)}; "
            f"{sum(m.get('rollouts_run', 0) for m in h)} rollouts at "
            f"{sum(m.get('rollouts_per_s') or 0 for m in h) / len(h):.1f}/s; time: rollouts "
            f"{100 * total['rollout_s'] / spent:.0f}%, learning {100 * total['seconds'] / spent:.0f}%, adapter sync "
            f"{100 * total['sync_s'] / spent:.0f}% ({total['sync_s'] / len(h):.2f} s per update).")


def _off_policy(history: list[dict]) -> str:
    """', importance ratio ... (updates on stale rollouts)' when some update trained on an older version's
    rollouts (a sync every N > 1 updates), else ''."""
    stale = [m for m in history if m.get("stale")]
    if not stale:
        return ""
    return (f", {len(stale)} update(s) on stale rollouts: |ratio - 1| {[round(m['ratio_dev'], 3) for m in stale]}"
            f", tokens clipped {[round(m['clipped'], 3) for m in stale]}")


def _spent(extra: dict) -> str:
    """A step's costs (``step.json``'s ``costs``), or '' for a step stored before costs were counted."""
    return Costs.from_dict(extra["costs"]).describe() if extra.get("costs") else ""


def _rounds(max_rounds: int) -> str:
    return f" (up to {max_rounds} runs each, sampled after the first)" if max_rounds > 1 else ""
