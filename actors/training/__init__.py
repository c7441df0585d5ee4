"""The training room: LoRA fine-tuning with peft, run by Ray Train (DDP or DeepSpeed ZeRO).

Modules: ``config`` (``LoraTrainConfig``), ``loop`` (the per-worker training loop and
``train_lora``, which runs it on Ray Train), ``guards`` (checks and errors), ``optim`` (the
optimizer step, token counts, lr schedule), ``trainer`` (builds the ``TorchTrainer``), ``rows``
(training rows as Parquet), ``grpo`` (GRPO's learner: LoRA policy-gradient updates from dspy's GRPO
groups, held in memory across steps; ``actors.dspy_side.reinforce`` drives it), ``learner_group`` (that
learner on several Ray workers, data parallel) and ``grpo_zero`` (its DeepSpeed ZeRO parts). Imports only the
shared modules of ``actors``; knows nothing of DSPy or
of the pool (``actors.dspy_side.finetune`` hands the adapter to the replicas).
"""

from actors.training.config import LoraTrainConfig
from actors.training.loop import TrainResult, train_lora

__all__ = ["LoraTrainConfig", "TrainResult", "train_lora"]
