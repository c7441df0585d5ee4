"""Fine-tune LoRA adapters of a pool's base model and serve them: Parquet data -> Ray Train -> adapter id.

Knows the two lifecycles — ``relaunch`` (the paper's: kill the replicas to free the cores /
accelerators, train, launch them again serving the adapters the pool served before plus the new
ones) and ``hotswap`` (train on other resources while the replicas keep serving, then hot-load)
— and the naming rule: every adapter gets a new id ``<base>:<prefix>[-<tag>]-<hash8>`` from the
adapter's own bytes, so DSPy's cache never answers a new version with an old one's outputs —
and the folder rule: an adapter's folder is ``adapter_dir_name(id)``, a file-name-safe slug of
the id plus a hash of the whole id, directly under ``adapter_root`` (a hub id ``org/name`` or a
checkpoint path as the base model never makes nested or outside folders).
Several datasets (one per predictor) are trained one after another inside a single kill/launch.
Adapters are trained into a staging dir and renamed into place only when complete.
Does not know DSPy programs or traces: callers hand it Parquet files of chat rows.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from actors import models, progress
from actors.dspy_side import usage
from actors.training.config import LoraTrainConfig
from actors.training.loop import train_lora
from actors.inference.pool import ReplicaPool

logger = logging.getLogger(__name__)

LIFECYCLES = ("relaunch", "hotswap")
T = TypeVar("T")


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
            launched again (serving what it served before) before the error propagates — not
            when a signal stops the driver (``KeyboardInterrupt``): then it stays down.
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
            started = time.monotonic()
            try:
                with progress.ticking(f"training {version} ({train.num_workers} worker(s), {train.epochs} epoch(s))"):
                    result = _in_thread(train_lora, train, model_path, str(data), str(staging), storage, name=version)
            finally:  # a failed fit held its devices too
                meter = usage.active()
                if meter is not None:
                    meter.add_training((time.monotonic() - started) * train.num_workers)
            staged[tag] = (staging, result.metrics)
            losses = result.metrics.get("loss_history") or []
            logger.info("trained %s in %.0fs%s", version, time.monotonic() - started,
                        f": loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} epoch(s)" if losses else "")

    if lifecycle == "hotswap":
        train_all()
    else:
        served = pool.adapter_records()
        pool.kill()  # free the cores / GPUs for training
        try:
            train_all()
        except Exception:
            pool.launch(adapters=served)  # serve again what was served; not when stopping (Ctrl-C, SIGTERM)
            raise
        pool.launch(adapters=served)
    results = {}
    for tag, (staging, metrics) in staged.items():
        name = f"{pool.model_id}:{staging.name.removeprefix('.staging-')}-{weights_digest(staging)}"
        final = root / adapter_dir_name(name)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        pool.load_adapter(name, str(final))
        results[tag] = FinetuneResult(name, str(final), metrics)
    return results


def _in_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread, waited for here.

    Ray Train's ``fit()`` replaces the main thread's SIGINT handler (and never restores it); off
    the main thread it does not, so Ctrl-C and SIGTERM keep stopping the driver while it trains.
    """
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the waiting thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name="tandem-train", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # wakes up for signals
    if "error" in box:
        raise box["error"]
    return box["result"]


def adapter_dir_name(adapter_id: str) -> str:
    """The folder name of an adapter: a readable slug of its id and 8 hex digits of the id's hash.

    Example:
        >>> adapter_dir_name("org/Model-7B:ft-02-1a2b3c4d")  # doctest: +SKIP
        'org-model-7b-ft-02-1a2b3c4d-5e6f7a8b'
    """
    digest = hashlib.sha256(adapter_id.encode()).hexdigest()[:8]
    return f"{_slug(adapter_id)[-80:].lstrip('-')}-{digest}"


def _slug(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", tag).strip("-").lower() or "x"


def weights_digest(adapter_dir: str | Path) -> str:
    """8 hex digits of the sha256 of an adapter's weight files: in its served name, so two adapters trained to
    different weights never share a name on a pool (and the same weights get the same one)."""
    digest = hashlib.sha256()
    for f in sorted(Path(adapter_dir).glob("adapter_model.*")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:8]
