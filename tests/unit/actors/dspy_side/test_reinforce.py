"""``TandemProvider`` is reinforceable: unmodified ``dspy.GRPO`` runs through ``TandemReinforceJob``.

The rollouts come from a scripted engine that records which model id each call named; the pool is a
stand-in that records adapter loads; the learner is the real one (``actors.training.grpo.Learner``,
torch + peft on the tiny model, in this process). What is checked: GRPO's calls reach the job in
dspy's order, each step's groups reach the learner, each version is loaded as a new adapter id, the
LM the program holds points at it so the next rollouts name it, the old version is unloaded, and
bad input is named. (``benchmarks/grpo_step.py`` runs it on a real pool; the ``g`` step runs on one in
``tests/integration/engine/steps/test_weight_tiny.py``.)
"""

import collections
import functools
import itertools
import re
import threading
from types import SimpleNamespace

import dspy
import pytest
from dspy import lm15
from dspy.teleprompt.grpo import GRPO  # dspy 3.4.1 does not export it as dspy.GRPO

from actors import models
from actors.dspy_side.provider import TandemProvider
from actors.dspy_side.reinforce import TandemReinforceJob
from actors.training.grpo import GRPOConfig, Learner

BASE = "tiny-llama"


def versions(names: list[str]) -> list[str]:
    """Served names without their weights' digest (``<base>:grpo-NN-vK-<8 hex>`` -> ``<base>:grpo-NN-vK``)."""
    return [re.sub(r"-[0-9a-f]{8}$", "", name) if ":grpo-" in name else name for name in names]


class Rollouts:
    """Answers 'a' or 'b' in turn for each question (each GRPO group then has reward variance); records
    each call's model."""

    def __init__(self):
        self.models, self._turns, self._lock = [], collections.defaultdict(itertools.count), threading.Lock()

    def __deepcopy__(self, memo):
        return self

    def complete(self, request):
        with self._lock:
            self.models.append(request.model)
            answer = "ab"[next(self._turns[request.messages[-1].text]) % 2]
        text = f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(text),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


class Pool:
    """What the job uses of a ``ReplicaPool``: launch, the base model, adapter loads and unloads."""

    def __init__(self):
        self.cfg = SimpleNamespace(name="stand-in", replica=SimpleNamespace(model=BASE))
        self.model_id, self.launched, self.loaded, self.unloaded = BASE, False, [], []
        self.provider = None

    def launch(self):
        self.launched = True

    def load_adapter(self, name, path):
        self.loaded.append((name, path))

    def unload_adapter(self, name):
        self.unloaded.append(name)

    def adapter_records(self):
        return [SimpleNamespace(name=name, path=path) for name, path in self.loaded if name not in self.unloaded]


@pytest.fixture(scope="module")
def tiny():
    return str(models.materialize(models.TINY))


def _provider(tmp_path, jobs):
    def in_process(model_path, cfg, cpus, gpus, init=None, workers=1):
        return Learner(model_path, cfg, init)

    def make(**kwargs):
        job = TandemReinforceJob(learner_factory=in_process, **kwargs)
        jobs.append(job)
        return job

    provider = TandemProvider(Pool(), adapter_root=tmp_path)
    provider.ReinforceJob = make  # dspy calls provider.ReinforceJob(lm=..., train_kwargs=...)
    return provider


def test_unmodified_dspy_grpo_trains_and_each_version_reaches_the_rollouts(tiny, tmp_path):
    jobs, engine = [], Rollouts()
    provider = _provider(tmp_path, jobs)
    lm = dspy.LM(BASE, engine=engine, provider=provider, cache=False, temperature=1.0, max_tokens=16)
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    trainset = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(4)]
    grpo = GRPO(metric=lambda ex, pred, trace=None: float(pred.answer == ex.answer), num_train_steps=2,
                     num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=4, exclude_demos=True,
                     num_threads=2, train_kwargs={"lr": 1e-3, "rank": 8, "alpha": 16, "groups_per_step": 2})
    grpo.compile(program, trainset=trainset)

    (job,) = jobs
    assert [m["step"] for m in job.history] == [1, 2] and all(m["groups"] == 2 for m in job.history)
    assert all(m["reward_mean"] == 0.5 and m["tokens"] > 0 and m["rollout_s"] > 0 for m in job.history)  # 'a' and 'b' in each group
    (v1, _), (v2, _) = provider.pool.loaded
    assert versions([v1, v2]) == [f"{BASE}:{job.job_id}-v1", f"{BASE}:{job.job_id}-v2"]
    assert provider.pool.unloaded == [v1]
    assert all((tmp_path / f"{job.job_id}-v{k}" / "adapter_config.json").is_file() for k in (1, 2))
    assert program.lm.model == v2 and job.state == "terminated"  # the program's LM, updated in place
    assert engine.models[0] == BASE and v1 in engine.models  # step 2's rollouts sampled version 1


def test_bad_grpo_settings_are_named_before_anything_starts(tmp_path):
    provider = _provider(tmp_path, [])
    lm = dspy.LM(BASE, engine=Rollouts(), provider=provider, cache=False)
    with pytest.raises(ValueError, match=r"unknown GRPO train_kwargs \['bogus'\]"):
        TandemReinforceJob(lm=lm, train_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="starts from the pool's base model"):
        TandemReinforceJob(lm=lm.copy(model=f"{BASE}:ft-01"), train_kwargs={})
    job = TandemReinforceJob(lm=lm, train_kwargs={}, learner_factory=functools.partial(lambda *a: None))
    with pytest.raises(ValueError, match="initialize"):
        job.step([], "grpo_chat")
    with pytest.raises(ValueError, match="takes 'grpo_chat' data"):
        job.step([], "chat")
    assert provider.pool.launched is False  # nothing started


def test_a_job_on_a_weight_steps_adapter_starts_the_policy_from_it_and_never_unloads_it(tiny, tmp_path):
    """``p -> w -> g``: the LM names the weight step's adapter; the learner starts from that adapter (not a
    fresh LoRA), and only the job's own versions are unloaded."""
    pool, starts = Pool(), []
    tuned = Learner(tiny, GRPOConfig(rank=8, alpha=16)).save(tmp_path / "ft-01")
    pool.load_adapter(f"{BASE}:ft-01", tuned)

    def factory(model_path, cfg, cpus, gpus, init=None, workers=1):
        starts.append(init)
        return Learner(model_path, cfg, init)

    lm = dspy.LM(f"{BASE}:ft-01", engine=Rollouts(), provider=TandemProvider(pool, adapter_root=tmp_path), cache=False)
    job = TandemReinforceJob(lm, {"lr": 1e-3, "groups_per_step": 1}, factory, job_id="grpo-03")
    job.initialize()
    group = {"batch_id": 0, "group": [{"messages": [{"role": "user", "content": "q"}], "reward": r,
                                       "completion": {"role": "assistant", "content": c}}
                                      for c, r in (("a", 1.0), ("b", 0.0))]}
    for _ in range(2):
        job.step([group], "grpo_chat")
    assert starts == [tuned]
    assert versions([lm.model]) == [f"{BASE}:grpo-03-v2"] and versions(pool.unloaded) == [f"{BASE}:grpo-03-v1"]
    with pytest.raises(ValueError, match="one of its adapters"):
        TandemReinforceJob(lm.copy(model=f"{BASE}:nowhere"), {}, factory)
