"""Shared fixtures for integration tests: one local Ray for the session, real models, adapters.

Pools are module-scoped so that one pool of vLLM engines runs at a time on small machines.
At the end of the session no vLLM EngineCore process started by it may be alive (a leaked engine
holds gigabytes for hours): ``_no_engine_outlives_the_session``.
"""

import os
import time
import uuid

import dspy
import psutil
import pytest
import ray

from actors import connect, models

SESSION_TAG = "TANDEM_TEST_SESSION"  # in the environment of every process this session starts


@pytest.fixture(scope="session", autouse=True)
def _no_engine_outlives_the_session():
    """Fail the session when an EngineCore it started is still alive 30 s after the session's end.

    The session's id goes into the environment first, so the local Ray started afterwards, its
    workers, the vLLM engines they spawn and any driver a test runs in a subprocess all carry it;
    engines of other people's sessions on the same machine do not, and are left out.
    """
    tag = uuid.uuid4().hex
    os.environ[SESSION_TAG] = tag
    started = time.time()
    yield
    procs = _session_engines(tag, started)
    _, alive = psutil.wait_procs(procs, timeout=30)
    alive = [p for p in alive if _running(p)]
    if alive:
        pytest.fail("vLLM EngineCore processes started by this test session outlived it:\n"
                    + "\n".join(_describe(p) for p in alive), pytrace=False)


def _session_engines(tag: str, since: float) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        info = proc.info
        text = f"{info['name'] or ''} {' '.join(info['cmdline'] or ())}"
        if "EngineCore" not in text or (info["create_time"] or 0) < since - 1:
            continue
        try:
            if proc.environ().get(SESSION_TAG) == tag and _running(proc):
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or another user's process
            continue
    return found


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        parent = psutil.Process(proc.ppid())
        parent_text = f"{parent.pid} ({' '.join(parent.cmdline())[:80] or parent.name()})"
    except psutil.Error:
        parent_text = "gone"
    try:
        rss = proc.memory_info().rss / 2**30
        return f"  pid {proc.pid} {' '.join(proc.cmdline())[:60]!r}, {rss:.2f} GiB, parent {parent_text}"
    except psutil.Error:
        return f"  pid {proc.pid} (exited while being described)"


@pytest.fixture(scope="session")
def _ray_shutdown():
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_ray_shutdown):
    """The test session's local Ray; started again if a test (the CLI resume test) stopped it."""
    if not ray.is_initialized():
        connect(num_cpus=2)


@pytest.fixture(scope="session")
def tiny_model():
    return str(models.materialize(models.TINY))


@pytest.fixture(scope="session")
def smollm2_model():
    return str(models.materialize(models.EMBEDDED))


@pytest.fixture(scope="session")
def iris_smollm2_run(tmp_path_factory, smollm2_model):
    """The session's one real `tandem run` on SmolLM2 (see ``iris_run``)."""
    from tests.integration.iris_run import finished_run

    if ray.is_initialized():  # the CLI starts its own local Ray; free the cores of the test session's
        ray.shutdown()
    return finished_run(tmp_path_factory.mktemp("iris-smollm2"))


def make_adapter(model_dir: str, out_dir, rank: int = 8, seed: int = 0) -> str:
    """A peft LoRA adapter with random (non-zero) weights on q/k/v/o, saved to ``out_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


class Lenient(dspy.ChatAdapter):
    """Reads every completion of the random tiny model as the answer "forty two", so its runs parse
    and pass an always-true metric, and the fine-tuning targets differ from what the model says."""

    def parse(self, signature, completion):
        return {name: "forty two" for name in signature.output_fields}


class TwoHops(dspy.Module):
    """A two-predictor program with only ``forward`` (as most users' programs are)."""

    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.answer = dspy.Predict("question, draft -> answer")

    def forward(self, question):
        return self.answer(question=question, draft=self.draft(question=question).draft)


def numbers(n: int) -> list:
    """``n`` toy question/answer examples."""
    return [dspy.Example(question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question") for i in range(n)]


def tiny_train_config(**changes):
    """LoRA settings that train the tiny model in seconds on one CPU and visibly move its weights."""
    from actors.training.config import LoraTrainConfig

    base = dict(rank=8, alpha=16, epochs=3, lr=5e-3, batch_size=4, micro_batch_size=2,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), cpus_per_worker=1, max_seq_len=256)
    return LoraTrainConfig(**{**base, **changes})


def lora_b_moved(adapter_dir) -> bool:
    """Whether every lora_B matrix of a saved adapter is non-zero (peft initialises B at 0)."""
    from pathlib import Path

    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    return bool(lora_b) and all(float(w.abs().max()) > 0 for w in lora_b)
