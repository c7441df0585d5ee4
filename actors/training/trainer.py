"""The Ray Train trainer that runs LoRA training (``make_trainer``): which failures it retries and,
for tests only, which loop its workers run.

Retries: ``lora.max_failures`` covers workers that die while training *and* workers that die while
the worker group starts; a start timeout is never retried. Why (Ray 2.60,
``ray/train/v2/_internal/execution/failure_handling/default.py``): Ray Train's
``DefaultFailurePolicy`` counts a worker that dies while running against
``FailureConfig.max_failures``, but a worker that dies while the group starts (its actor dies
before ``get_metadata`` / ``init_train_context`` answer: ``WorkerGroupStartupFailedError``) is a
*controller* error, counted against ``controller_failure_limit`` together with a start timeout
(``WorkerGroupStartupTimeoutError``). Tandem sets that limit to 0, since Ray's default (-1) waits
for busy resources forever (``actors.training.guards.run_config``); so a start failure was never
retried (``ControllerError: ... failed to initialize``) and raising the limit would retry the
resource wait too. ``StartFailuresCount`` charges a start failure to ``max_failures`` instead (one
budget for both kinds of worker death; the retry starts a new worker group in the same run, from
its latest checkpoint if it has one) and leaves everything else to Ray's policy.

Test hook: ``$TANDEM_TEST_TRAIN_LOOP`` (``package.module:function``) names a loop the workers run
instead of the LoRA loop (``tests/integration/cluster/gpu_doubles.py``: a scripted loop on fake GPUs).

Does not know what the loop does, nor the errors it returns (``actors.training.loop``); relies on two
Ray 2.60 internals (the policy class and ``DataParallelTrainer._initialize_and_run_controller``),
checked by ``tests/integration/actors/training/test_start_retry.py``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Callable

from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import ControllerError

from actors.training.guards import run_config, worker_resources

if TYPE_CHECKING:
    from actors.training.config import LoraTrainConfig

logger = logging.getLogger(__name__)

TEST_LOOP_ENV = "TANDEM_TEST_TRAIN_LOOP"


class StartFailuresCount(DefaultFailurePolicy):
    """Ray's default policy, but a worker group that failed to start counts as a worker failure."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        cause = getattr(training_failed_error, "controller_failure", None)
        if not (isinstance(training_failed_error, ControllerError)
                and isinstance(cause, WorkerGroupStartupFailedError)):
            return super().make_decision(training_failed_error)
        self._worker_group_failures += 1  # the budget Ray charges a worker that dies while training
        limit = self.failure_config.max_failures
        retry = limit == -1 or self._worker_group_failures <= limit
        logger.warning("a training worker died while the worker group started (%s); %s (failure %d, "
                       "lora.max_failures=%d)", str(cause).splitlines()[0],
                       "starting the workers again" if retry else "giving up", self._worker_group_failures, limit)
        return FailureDecision.RETRY if retry else FailureDecision.RAISE


class LoraTorchTrainer(TorchTrainer):
    """``TorchTrainer`` whose controller decides with ``StartFailuresCount``."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = StartFailuresCount(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def make_trainer(cfg: LoraTrainConfig, loop: Callable[[dict], dict], loop_config: dict, storage_path: str,
                 name: str) -> LoraTorchTrainer:
    """The trainer of ``cfg.num_workers`` workers running ``loop(loop_config)`` (or the test loop).

    Example:
        >>> make_trainer(LoraTrainConfig(), train_loop, {...}, "/tmp/ray_train", "ft-02").fit()  # doctest: +SKIP
    """
    scripted = scripted_loop()
    return LoraTorchTrainer(
        scripted or loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        torch_config=TorchConfig(backend="gloo") if scripted else None,
        run_config=run_config(cfg, name, storage_path))


def scripted_loop() -> Callable[[dict], dict] | None:
    """Tests only: the function ``$TANDEM_TEST_TRAIN_LOOP`` names (``package.module:function``), run by
    the same workers with the same config and return contract (it writes the adapter files and reports
    the checkpoint itself), under a gloo process group since such a loop does not touch the
    accelerators (a local Ray's fake GPUs have no NCCL); None when the variable is unset.

    Raises:
        ValueError: the variable is not of the form ``package.module:function``.
    """
    spec = os.environ.get(TEST_LOOP_ENV)
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{TEST_LOOP_ENV}={spec!r}: expected 'package.module:function'")
    logger.warning("%s is set: the training workers run %s, not the LoRA training loop", TEST_LOOP_ENV, spec)
    return getattr(importlib.import_module(module), attr)
