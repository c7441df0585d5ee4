"""The paper-table files: ``table.md``, ``table.csv``, ``table.json`` and ``table.png``.

Layout as in the paper's tables: one row per strategy, the mean test score over seeds and one
column per seed; a cell without a score shows "–" and its reason is listed under the table; a
cell whose program answers one thing to every test input (``HeldOut.one_answer``) is marked.
Knows only ``Cell`` rows; matplotlib (Agg) is imported lazily. Does not run anything.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from engine.held_out import HeldOut
from engine.table.config import Cell

DASH = "–"


def summarize(cells: list[Cell]) -> list[dict]:
    """Per strategy, in first-seen order: per-seed test scores, their mean and std, and reasons."""
    rows: dict[str, dict] = {}
    for c in cells:
        row = rows.setdefault(c.strategy, {"strategy": c.strategy, "scores": {}, "reasons": {}, "one_answer": {}})
        row["scores"][c.seed] = c.test_score
        if c.reason:
            row["reasons"][c.seed] = c.reason
        held = HeldOut.from_dict(c.held_out) if c.held_out else None
        if held is not None and held.one_answer:
            row["one_answer"][c.seed] = held.describe()
    for row in rows.values():
        got = [v for v in row["scores"].values() if v is not None]
        row["mean"] = round(statistics.fmean(got), 2) if got else None
        row["std"] = round(statistics.pstdev(got), 2) if len(got) > 1 else None
        row["n"] = len(got)
    return list(rows.values())


def write_table(cells: list[Cell], out_dir: str | Path, title: str, settings: dict) -> dict[str, Path]:
    """Write the four files into ``out_dir``; return their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(cells)
    seeds = sorted({c.seed for c in cells})
    paths = {"md": out / "table.md", "csv": out / "table.csv", "json": out / "table.json", "png": out / "table.png"}
    paths["md"].write_text(_markdown(rows, seeds, title))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "seed", "test_score", "dev_score", "reason", "wall_s", "run_dir"])
        for c in cells:
            writer.writerow([c.strategy, c.seed, _num(c.test_score, ""), _num(c.dev_score, ""), c.reason or "",
                             round(c.wall_s, 1), c.run_dir])
    paths["json"].write_text(json.dumps({"title": title, "settings": settings, "rows": rows,
                                         "cells": [vars(c) for c in cells]}, indent=2, default=str))
    _chart(rows, seeds, title, paths["png"])
    return paths


def _markdown(rows: list[dict], seeds: list[int], title: str) -> str:
    lines = [f"# {title}", "", "Test-set accuracy (%) of the program each strategy ends with.", "",
             "| strategy | mean | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    notes: dict[str, int] = {}
    for row in rows:
        mean = _num(row["mean"], DASH)
        if row["mean"] is not None and row["n"] < len(seeds):
            mean += f" ({row['n']}/{len(seeds)} seeds)"
        cells = []
        for s in seeds:
            value = row["scores"].get(s)
            reason = row["reasons"].get(s)
            mark = f" [{notes.setdefault(reason, len(notes) + 1)}]" if reason else ""
            one = row["one_answer"].get(s)
            mark += f" [{notes.setdefault(f'answers one thing: {one}', len(notes) + 1)}]" if one else ""
            cells.append(_num(value, DASH) + mark)
        lines.append(f"| `{row['strategy']}` | {mean} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"[{n}] {reason}" for reason, n in notes.items()]]
    lines += ["", "![table](table.png)", ""]
    return "\n".join(lines)


def _num(value: float | None, empty: str) -> str:
    return empty if value is None else f"{value:.1f}"


def _chart(rows: list[dict], seeds: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.6))
    means = [row["mean"] or 0.0 for row in rows]
    errs = [row["std"] or 0.0 for row in rows]
    bars = ax.bar(range(len(rows)), means, yerr=errs, capsize=3, color="#4C72B0")
    ax.bar_label(bars, labels=[_num(row["mean"], DASH) for row in rows], padding=2)
    for i, row in enumerate(rows):
        dots = [row["scores"][s] for s in seeds if row["scores"].get(s) is not None]
        ax.scatter([i] * len(dots), dots, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(rows)), [row["strategy"] for row in rows], rotation=20)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
