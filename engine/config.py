"""``RunConfig``: everything one ``tandem run`` needs, from flags and/or a YAML file.

Knows the fields, their types, help and defaults (the embedded default: Iris on SmolLM2-135M, 2
vLLM-CPU replicas, ``p -> w -> p`` on a budget that fits 2 cores), YAML loading with values typed by
field (``lr: 1e-5`` is a float) and unknown keys or bad values refused by name at load time
(``actors.typed_config``), and the fingerprint a resumed run must match (where a run is tracked is
not part of it). The CLI's flags are made from these fields. Does not run anything.
"""

from __future__ import annotations

from dataclasses import asdict, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from actors.dspy_side.evaluator import EvaluatorConfig
from actors.dspy_side.finetune import LIFECYCLES
from actors.training.config import LoraTrainConfig
from actors.models import EMBEDDED
from actors.typed_config import from_mapping, typed_config
from engine import strategy as strategies
from engine.adapters.registry import ADAPTERS
from engine.steps.grpo import GRPOStepConfig
from engine.steps.kinds import RL_KINDS, model_refs, resolve_steps, weight_keys


@typed_config
class PromptConfig:
    """Prompt-step budget (paper: 6 candidates, <= 3 demos per module)."""

    num_candidate_programs: int = field(default=6, metadata={"help": "random candidates besides the 3 fixed seeds"})
    max_bootstrapped_demos: int = field(default=3, metadata={"help": "bootstrapped demos per predictor"})
    max_labeled_demos: int = field(default=3, metadata={"help": "demos per predictor in all"})


@typed_config
class ModelGroup:
    """A model served beside the run's own (the student): its own vLLM replicas, named by steps as a
    teacher (``teacher:`` of a bfrs or finetune step), GEPA's reflection LM (``reflection_model:``) or
    MIPROv2's prompt model (``prompt_model:``). Never fine-tuned: the weight steps touch only the student."""

    model: str = field(metadata={"help": "built-in name, HF checkpoint dir or hub id"})
    replicas: int = field(default=1, metadata={"help": "vLLM replicas of this model"})
    cpus_per_replica: float = field(default=1.0, metadata={"help": "CPUs per replica"})
    gpus_per_replica: float = field(default=0.0, metadata={"help": "GPUs per replica (0 = CPU path)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size"})
    max_model_len: int = field(default=2048, metadata={"help": "context length"})
    dtype: str = field(default="auto", metadata={
        "help": "'auto' (float32 on CPU, bfloat16 on GPU) or a torch dtype; bfloat16 on a CPU with AVX512-BF16 "
                "(benchmarks/teacher_model.py)"})
    max_tokens: int | None = field(default=None, metadata={"help": "completion tokens per call (default: the run's)"})
    engine_kwargs: dict = field(default_factory=dict, metadata={"help": "extra vLLM engine arguments"})
    replica_resources: dict[str, float] = field(default_factory=dict, metadata={
        "help": "custom Ray resources each replica reserves"})

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.cpus_per_replica <= 0 or self.gpus_per_replica < 0:
            raise ValueError("replicas must be >= 1, cpus_per_replica > 0 and gpus_per_replica >= 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


STUDENT = "student"  # the run's own model (``model:``), which the weight steps fine-tune


@typed_config
class RunConfig:
    """One optimization run."""

    program: str = field(default="iris", metadata={"help": "iris, gsm8k, hotpotqa, or 'package.module[:Factory]'"})
    program_args: dict = field(default_factory=dict, metadata={
        "help": "keyword arguments of the program's Program() (e.g. retriever=bm25:corpus.jsonl)"})
    data_args: dict = field(default_factory=dict, metadata={
        "help": "keyword arguments of its load_splits(): paths, sizes (e.g. path=/data/gsm8k)"})
    model: str = field(default=EMBEDDED, metadata={"help": "built-in name, HF checkpoint dir or hub id"})
    strategy: str = field(default="p -> w -> p", metadata={"help": "steps joined by ' -> '"})
    run_dir: str = field(default="runs/iris-smollm2", metadata={
        "help": "where steps, adapters and report go; a rerun with the same dir resumes"})
    seed: int = field(default=0, metadata={"help": "data split, shuffles and candidates"})
    train_size: int = field(default=30, metadata={"help": "training examples used (0 = all)"})
    val_size: int = field(default=15, metadata={"help": "validation examples used (0 = all)"})
    test_size: int = field(default=0, metadata={
        "help": "held-out test examples every step's program is scored on at the end (0 = all, -1 = none)"})
    replicas: int = field(default=2, metadata={"help": "vLLM replicas"})
    cpus_per_replica: float = field(default=1.0, metadata={"help": "CPUs per replica"})
    gpus_per_replica: float = field(default=0.0, metadata={"help": "GPUs per replica (0 = CPU path)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size"})
    max_model_len: int = field(default=2048, metadata={"help": "context length"})
    max_tokens: int = field(default=200, metadata={"help": "completion tokens per LM call"})
    adapter: str = field(default="constrained", metadata={
        "choices": ADAPTERS,
        "help": "how prompts are written and answers read: 'chat' (DSPy's ChatAdapter), 'json' (JSONAdapter, "
                "decoded under its JSON schema) or 'constrained' (ChatAdapter's layout enforced: every answer "
                "parses); the same for every step, the training rows, the test scores and the server"})
    threads: int = field(default=32, metadata={
        "help": "concurrent program runs (LM calls in flight) in the driver; with evaluators.count > 0, "
                "evaluators.threads each instead"})
    exclude_demos: bool = field(default=True, metadata={
        "help": "weight step: train on vanilla prompts and drop the demos (the paper's); false trains with the "
                "program's demos in the prompt and keeps them (dspy's BootstrapFinetune default)"})
    w_rounds: int = field(default=1, metadata={
        "help": "weight step: runs per training example at most while collecting traces; rounds after the first "
                "sample at temperature 1.0 (dspy's BootstrapFewShot max_rounds); 1 = greedy once (the paper's)"})
    lifecycle: str = field(default="relaunch", metadata={
        "help": "'relaunch' or 'hotswap' after fine-tuning", "choices": LIFECYCLES})
    address: str | None = field(default=None, metadata={"help": "Ray address; default $RAY_ADDRESS or local"})
    storage: str | None = field(default=None, metadata={
        "help": "copy the run dir here when the run ends and resume from it (path or s3://, gs://, file:// URI)"})
    tracking: bool = field(default=True, metadata={
        "help": "log the run to MLflow when it ends: params, metrics and artifacts per step, the winner"})
    tracking_uri: str | None = field(default=None, metadata={
        "help": "MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<run dir's parent>/mlflow.db "
                "(which `mlflow ui --backend-store-uri` opens)"})
    plan_check: bool = field(default=True, metadata={
        "help": "refuse to start when the cluster's nodes cannot hold the run (false on autoscaling clusters)"})
    steps: dict[str, dict] = field(default_factory=dict, metadata={
        "help": "step keys a strategy can name, beside the built-in p (bfrs), w (finetune), gepa and mipro: "
                "KEY={kind: bfrs|finetune|gepa|mipro|'package.module:Class', <its arguments>, compile_args: {...}}; "
                "an entry for a built-in key without kind changes its arguments (gepa={max_metric_calls: 200})"})
    models: dict[str, ModelGroup] = field(default_factory=dict, metadata={
        "flag": "model_group",
        "help": "models served beside the run's own, by name, for steps to use as teacher / reflection_model / "
                "prompt_model: NAME={model: ..., replicas: 1, cpus_per_replica: 1, ...}; each is up from the first "
                "step that names it to the last"})
    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(num_candidate_programs=3),
                                 metadata={"help": "prompt-step budget (3 random + 3 fixed = 6 candidates)"})
    lora: LoraTrainConfig = field(default_factory=lambda: LoraTrainConfig(
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), epochs=2, lr=1e-3, batch_size=4, cpus_per_worker=2),
        metadata={"help": "LoRA training (paper's r/alpha; on CPU q/k/v/o, 2 epochs, lr 1e-3, batch 4: "
                          "benchmarks/lora_defaults.py)"})
    grpo: GRPOStepConfig = field(default_factory=lambda: GRPOStepConfig(lr=1e-4, rank=8, alpha=16, micro_batch_size=2),
                                 metadata={
        "help": "the g step (GRPO): updates, examples per update, group size, rollout temperature, sync_every, the "
                "learner's LoRA (rank 8 on CPU), lr, beta (KL), loss ('grpo' or 'token'), micro-batch (2: a "
                "[batch, length, vocab] logits tensor beside two replicas in 23 GB) and its CPUs/GPUs"})
    evaluators: EvaluatorConfig = field(default_factory=EvaluatorConfig, metadata={
        "help": "where program runs happen: the driver's threads, or evaluator actors (many replicas)"})
    engine_kwargs: dict = field(default_factory=dict, metadata={"help": "extra vLLM engine arguments"})
    replica_resources: dict[str, float] = field(default_factory=dict, metadata={
        "help": "custom Ray resources each replica reserves, to place replicas on the nodes that offer them "
                "(e.g. inference=1; training workers: lora.resources)"})

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {list(ADAPTERS)}, got {self.adapter!r}")
        trains = self.trains()  # also checks the steps table and the strategy's keys, by name
        self.group_uses()  # every model a step names is one of models:
        if self.adapter == "json" and (trains or self.reinforces()):
            raise ValueError("adapter 'json' cannot write the weight step's training rows (dspy's JSONAdapter has "
                             "no fine-tuning format): use adapter 'chat' or 'constrained', or a strategy without "
                             "'w' or 'g'")
        if self.lifecycle not in LIFECYCLES:
            raise ValueError(f"lifecycle must be 'relaunch' or 'hotswap', got {self.lifecycle!r}")
        if self.train_size < 0 or self.val_size < 0 or self.replicas < 1 or self.threads < 1:
            raise ValueError("train_size/val_size must be >= 0, replicas and threads >= 1")
        if self.w_rounds < 1:
            raise ValueError(f"w_rounds must be >= 1, got {self.w_rounds}")
        if self.test_size < -1:
            raise ValueError(f"test_size must be >= 0 (0 = all) or -1 (none), got {self.test_size}")

    def fingerprint(self) -> dict:
        """Settings a resumed run must share (not where it runs — address, the nodes' custom resources,
        evaluators —, is stored or tracked, the thread count, or the test size: held-out results record their size and
        are redone when it changes)."""
        data = asdict(self)
        for key in ("address", "threads", "run_dir", "storage", "plan_check", "test_size", "tracking", "tracking_uri",
                    "replica_resources", "evaluators"):
            data.pop(key)
        data["lora"].pop("resources")  # where the workers run, not what they compute
        for group in data["models"].values():
            group.pop("replica_resources")
        if not data["models"]:
            data.pop("models")  # as run dirs written before model groups have it
        if not self.reinforces():
            data.pop("grpo")  # no g step: its settings change nothing (and older run dirs lack them)
        return data

    def step_table(self) -> dict[str, dict]:
        """Every step key a strategy can name -> its entry (``kind`` and arguments), built-ins included."""
        return resolve_steps(self.steps)

    def strategy_keys(self) -> list[str]:
        """The strategy's step keys in order (none for an empty strategy: ``tandem table``'s vanilla row)."""
        return strategies.parse(self.strategy, self.step_table()) if self.strategy.strip() else []

    def trains(self) -> bool:
        """Whether a step of the strategy trains the model (a ``finetune`` kind)."""
        return bool(set(self.strategy_keys()) & weight_keys(self.step_table()))

    def reinforces(self) -> bool:
        """Whether a step of the strategy is a GRPO step (a ``grpo`` kind: a learner beside the replicas)."""
        return bool(set(self.strategy_keys()) & weight_keys(self.step_table(), RL_KINDS))

    def group_uses(self) -> dict[str, list[int]]:
        """Each model group -> the strategy's step positions (1-based) that use it; empty for a group no
        step names (it is never launched).

        Raises:
            ValueError: a step names a model that is not in ``models`` (named, with the ones there are), or
                ``models`` has a group named ``student``.
        """
        if STUDENT in self.models:
            raise ValueError(f"models: '{STUDENT}' is the run's own model (model:); name a group otherwise")
        table = self.step_table()
        uses: dict[str, list[int]] = {name: [] for name in self.models}
        for index, key in enumerate(self.strategy_keys(), start=1):
            for arg, name in model_refs(table[key]).items():
                if name not in self.models:
                    raise ValueError(f"steps.{key}.{arg}: no model {name!r} in this run's models "
                                     f"({sorted(self.models) or 'none declared'}); declare it under models: "
                                     f"(--model-group {name}={{model: ...}})")
                uses[name].append(index)
        return uses

    def with_overrides(self, **changes: Any) -> "RunConfig":
        """A copy with the non-None ``changes`` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_yaml(path: str | Path) -> RunConfig:
    """A ``RunConfig`` from YAML; nested ``prompt:`` and ``lora:`` sections; values typed by field. A section
    changes only the keys it names: the others keep the run's defaults (``lora: {epochs: 4}`` keeps lr 1e-3 and
    q/k/v/o, as ``--lora-epochs 4`` does), not the section class's own.

    Raises:
        ValueError: a malformed file, unknown keys (named, with the valid ones) or values of the
            wrong type (``run.yaml: replicas: input should be a valid integer (got 'two')``).
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    data = {} if data is None else data
    if isinstance(data, dict):
        defaults = RunConfig()
        for f in fields(RunConfig):
            section = getattr(defaults, f.name)
            if is_dataclass(section) and isinstance(data.get(f.name), dict):
                data = {**data, f.name: {**{g.name: getattr(section, g.name) for g in fields(section)}, **data[f.name]}}
    return from_mapping(RunConfig, data, str(path))
