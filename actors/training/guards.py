"""Guards of LoRA training (``actors.training.loop``): the checks and errors that turn its faults into
clear messages before or while the Ray Train workers run.

Knows: which rows have a completion token inside ``max_seq_len`` (``learnable``, ``RowCheck``) and
the errors for data with no such row (``NoCompletionError``) and for a loss that became NaN/inf
(``NonFiniteLossError``); what one training worker asks Ray for and whether the cluster can ever
hold the workers (``check_cluster``, from ``actors.runtime.cluster_now``); how long Ray Train may wait for busy
resources (``start_timeout``, Ray Train's ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``) and the
``ResourceWaitTimeout`` text when it gives up (``wait_message``); the ``RunConfig`` whose
``FailureConfig`` retries a failed worker group ``max_failures`` times but never a start timeout.
Does not know tokenizers, models, the training loop or how the errors are raised and carried back
(``actors.training.loop`` does); it reads the settings from the ``LoraTrainConfig`` it is passed and
imports Ray only inside the calls that need it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from actors.environ import environ

if TYPE_CHECKING:
    from actors.training.config import LoraTrainConfig

logger = logging.getLogger(__name__)

# Ray Train 2.60 (ray/train/v2/_internal/constants.py): how long a worker group's placement group
# may wait for resources; read from the driver's environment when fit() starts the controller.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class NoCompletionError(ValueError):
    """No training row has a completion token inside ``max_seq_len``."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; no adapter was written."""


class ResourceWaitTimeout(TimeoutError):
    """The training workers did not get their (existing but busy) resources in ``resource_wait_s``."""


@dataclass(frozen=True)
class RowCheck:
    """Which rows have at least one completion token inside ``max_seq_len``."""

    keep: tuple[int, ...]
    rows: int
    max_seq_len: int
    shortest_prompt: int
    longest_prompt: int

    @property
    def dropped(self) -> int:
        return self.rows - len(self.keep)

    def error(self) -> NoCompletionError:
        """The error for data of which no row is left."""
        if not self.rows:
            return NoCompletionError("the training data has no rows")
        return NoCompletionError(
            f"none of the {self.rows} training rows has a completion token within max_seq_len="
            f"{self.max_seq_len}: the prompts alone take {self.shortest_prompt}-{self.longest_prompt} tokens "
            f"(longest prompt {self.longest_prompt}). Raise lora.max_seq_len above {self.longest_prompt} "
            "(plus the completion's length), or shorten the prompts")

    def warning(self) -> str:
        return (f"dropped {self.dropped} of {self.rows} training rows whose prompt fills max_seq_len="
                f"{self.max_seq_len} (longest prompt {self.longest_prompt} tokens): they have no completion "
                "token to learn; raise lora.max_seq_len to keep them")


def learnable(lengths: list[tuple[int, int]], max_seq_len: int) -> RowCheck:
    """Check rows given as (full length, prompt length) pairs, both untruncated.

    Example:
        >>> learnable([(12, 8), (30, 20)], max_seq_len=16).keep
        (0,)
    """
    keep = tuple(i for i, (full, prompt) in enumerate(lengths) if prompt < min(full, max_seq_len))
    prompts = [prompt for _, prompt in lengths] or [0]
    return RowCheck(keep, len(lengths), max_seq_len, min(prompts), max(prompts))


def non_finite_message(value: float, epoch: int, step: int, steps: int, lr: float) -> str:
    """The NonFiniteLossError text: where it happened and what usually causes it."""
    seen = f"the loss is {value}" if not math.isfinite(value) else "another worker's loss is not finite"
    return (f"training diverged at epoch {epoch + 1}, micro-batch {step + 1} of {steps}: {seen}; no adapter "
            f"was written. Likely causes: the learning rate (lora.lr={lr:g}) is too high, bf16 overflow "
            "(try lora.bf16: 'no'), or broken rows in the training data")


def worker_resources(cfg: LoraTrainConfig) -> dict[str, float]:
    """What one training worker asks Ray for (its custom ``resources`` included)."""
    return {"CPU": float(cfg.cpus_per_worker), **({"GPU": 1.0} if cfg.use_gpu else {}), **cfg.resources}


def check_cluster(cfg: LoraTrainConfig, total: dict, nodes: list[dict] | None = None) -> None:
    """Raise ``ValueError`` when the cluster can never hold ``cfg``'s training workers.

    Args:
        cfg: the training settings (num_workers, cpus_per_worker, use_gpu).
        total: the cluster's resources (``ray.cluster_resources()``, or an autoscaler's maximum).
        nodes: each alive node's resources when the cluster cannot grow; None skips the check
            that one worker fits on one node.

    Example:
        >>> from actors.training.config import LoraTrainConfig
        >>> check_cluster(LoraTrainConfig(num_workers=2, cpus_per_worker=1), {"CPU": 2.0}, [{"CPU": 2.0}])
    """
    per = worker_resources(cfg)
    need = {k: v * cfg.num_workers for k, v in per.items()}
    short = [k for k, v in need.items() if v > total.get(k, 0.0)]
    if short:
        fix = "lower lora.num_workers or lora.cpus_per_worker" if "CPU" in short else "lower lora.num_workers"
        fix += ", set lora.use_gpu: false" if "GPU" in short else ""
        raise ValueError(f"the cluster cannot hold the training workers: they need {_fmt(need)} ({cfg.num_workers} "
                         f"x {_fmt(per)}) but the cluster has {_fmt({k: total.get(k, 0.0) for k in need})} in all; "
                         f"{fix}, or add nodes")
    if nodes is not None and not any(all(n.get(k, 0.0) >= v for k, v in per.items()) for n in nodes):
        raise ValueError(f"no node can hold one training worker ({_fmt(per)}): the nodes have "
                         + "; ".join(_fmt({k: n.get(k, 0.0) for k in per}) for n in nodes)
                         + ". Lower lora.cpus_per_worker (or set lora.use_gpu: false), or add a larger node")


def wait_message(cfg: LoraTrainConfig, free: dict) -> str:
    """The ResourceWaitTimeout text: what the workers waited for and what is free now."""
    per = worker_resources(cfg)
    need = {k: v * cfg.num_workers for k, v in per.items()}
    return (f"the {cfg.num_workers} training workers waited lora.resource_wait_s={cfg.resource_wait_s:g} s for "
            f"{_fmt(need)} ({cfg.num_workers} x {_fmt(per)}) and did not get them: free now "
            f"{_fmt({k: free.get(k, 0.0) for k in need})}. Something else holds them (replicas in the hotswap "
            "lifecycle, another run): free them, lower lora.num_workers / lora.cpus_per_worker, or raise "
            "lora.resource_wait_s")


def run_config(cfg: LoraTrainConfig, name: str, storage_path: str):
    """Ray Train's RunConfig: ``max_failures`` retries of a failed worker group, no retry of a start
    timeout (``controller_failure_limit`` 0; Ray's default, -1, retries it forever). A worker that dies
    while the group starts is charged to ``max_failures`` by ``actors.training.trainer``, not to this limit."""
    from ray.train import FailureConfig, RunConfig

    return RunConfig(name=name, storage_path=storage_path,
                     failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=0))


@contextlib.contextmanager
def start_timeout(seconds: float):
    """Bound Ray Train's wait for the workers' placement group while the block runs (the driver's
    environment is copied to the controller when ``fit()`` starts it)."""
    with environ({START_TIMEOUT_ENV: f"{seconds:g}"}):
        yield


def _fmt(resources: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())
