"""Fine-tune LoRA adapters of a pool's base model and serve them: Parquet data -> Ray Train -> adapter id.

Knows the two lifecycles — ``relaunch`` (the paper's: kill the replicas to free the cores /
accelerators, train, launch them again serving the adapters the pool served before plus the new
ones) and ``hotswap`` (train on other resources while the replicas keep serving, then hot-load)
— and the naming rule: every adapter gets a new id ``<base>:<prefix>[-<tag>]-<hash8>`` from the
adapter's own bytes, so DSPy's cache never answers a new version with an old one's outputs.
Several datasets (one per predictor) are trained one after another inside a single kill/launch.
Adapters are trained into a staging dir and renamed into place only when complete.
Does not know DSPy programs or traces: callers hand it Parquet files of chat rows.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from actors import models
from actors.lora_train import LoraTrainConfig, train_lora
from actors.pool import ReplicaPool

LIFECYCLES = ("relaunch", "hotswap")


@dataclass(frozen=True)
class FinetuneResult:
    """One trained and served adapter."""

    name: str
    path: str
    metrics: dict


def finetune(pool: ReplicaPool, datasets: Mapping[str, str | Path], train: LoraTrainConfig, *,
             lifecycle: str, adapter_root: str | Path, prefix: str,
             storage: str | Path | None = None) -> dict[str, FinetuneResult]:
    """Train one adapter per dataset and leave the pool serving all of them.

    Args:
        pool: the pool whose base model is fine-tuned (launched, or killed by the caller when
            ``relaunch`` is wanted and the replicas are already down).
        datasets: tag -> Parquet file of chat rows; the tag '' names the multitask adapter.
        train: LoRA and optimisation settings.
        lifecycle: 'relaunch' or 'hotswap'.
        adapter_root: where the adapters' folders go.
        prefix: version prefix of the new ids, e.g. 'ft-02' (unique per step).
        storage: Ray Train storage (local path or pyarrow-filesystem URI); default
            ``adapter_root/.ray_train``.

    Returns:
        tag -> the served adapter.

    Raises:
        ValueError: unknown lifecycle or no datasets.
        ray.train.TrainingFailedError: a training worker failed; with ``relaunch`` the pool is
            launched again (serving what it served before) before the error propagates.
    """
    if lifecycle not in LIFECYCLES:
        raise ValueError(f"lifecycle must be one of {LIFECYCLES}, got {lifecycle!r}")
    if not datasets:
        raise ValueError("no datasets to fine-tune on")
    root = Path(adapter_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model_path = models.resolve(pool.cfg.replica.model)
    storage = str(storage) if "://" in str(storage) else str(Path(storage or root / ".ray_train").resolve())
    staged: dict[str, tuple[Path, dict]] = {}

    def train_all() -> None:
        for tag, data in datasets.items():
            version = f"{prefix}-{_slug(tag)}" if tag else prefix
            staging = root / f".staging-{version}"
            data = data if "://" in str(data) else Path(data).resolve()  # workers run in other dirs
            result = train_lora(train, model_path, str(data), str(staging), storage, name=version)
            staged[tag] = (staging, result.metrics)

    if lifecycle == "hotswap":
        train_all()
    else:
        served = pool.adapter_records()
        pool.kill()  # free the cores / GPUs for training
        try:
            train_all()
        finally:
            pool.launch(adapters=served)  # serve again, trained or not
    results = {}
    for tag, (staging, metrics) in staged.items():
        name = f"{pool.model_id}:{staging.name.removeprefix('.staging-')}-{_digest(staging)}"
        final = root / name.replace(":", "_")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        pool.load_adapter(name, str(final))
        results[tag] = FinetuneResult(name, str(final), metrics)
    return results


def _slug(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", tag).strip("-").lower() or "x"


def _digest(adapter_dir: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(adapter_dir.glob("adapter_model.*")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:8]
