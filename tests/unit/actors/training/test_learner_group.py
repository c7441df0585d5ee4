"""GRPO's learner on two Ray workers (real Ray actors, real torch.distributed over gloo, the tiny random Llama):
the data-parallel update is the one-worker update, the ranks stay equal, a worker with no rows of its own still
joins the reduction, the group saves, resumes and stops like one learner, and a GRPO job with
``learner_workers: 2`` runs on one (the pool is test_reinforce's stand-in). Under DeepSpeed ZeRO-2 and ZeRO-3
(real DeepSpeed on CPU) the group takes the same updates, on-policy and off, and its saved state and a plain
learner's resume each other."""

import dataclasses

import dspy
import pytest
import ray

from actors import connect, models
from actors.dspy_side.provider import TandemProvider
from actors.dspy_side.reinforce import TandemReinforceJob, ray_learner
from actors.training.grpo import GRPOConfig, Learner
from actors.training.learner_group import LearnerGroup

PROMPT = [{"role": "user", "content": "Say a colour."}]
GOOD, BAD = {"role": "assistant", "content": "blue"}, {"role": "assistant", "content": "seventeen horses"}
OTHER = {"role": "assistant", "content": "green, like grass"}
CFG = GRPOConfig(lr=5e-3, rank=8, alpha=16, micro_batch_size=2, threads=1)


@pytest.fixture(scope="module")
def tiny():
    connect(num_cpus=2)
    yield str(models.materialize(models.TINY))
    ray.shutdown()


def _group(rewards_by_completion, batch_id=0):
    return {"batch_id": batch_id, "group": [{"messages": PROMPT, "completion": c, "reward": r}
                                            for c, r in rewards_by_completion]}


BATCH = [_group([(GOOD, 1.0), (BAD, 0.0), (OTHER, 0.0), (GOOD, 1.0), (BAD, 0.5)]),
         _group([(OTHER, 1.0), (BAD, 0.0), (GOOD, 0.2)], 1)]


def test_two_workers_take_the_one_worker_update_and_stay_equal(tiny, tmp_path):
    one = Learner(tiny, CFG)
    group = ray_learner(tiny, CFG, 0, 0, None, workers=2)  # what a job with learner_workers: 2 builds
    try:
        assert isinstance(group, LearnerGroup) and len(group.workers) == 2
        for _ in range(2):
            expected, got = one.step(BATCH), group.step(BATCH)
            for key in ("rollouts", "tokens", "zero_variance_groups", "step"):
                assert got[key] == expected[key]
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
            assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
        for completion in (GOOD, BAD, OTHER):  # the policy moved as the single learner's did
            assert group.logprob(PROMPT, completion) == pytest.approx(one.logprob(PROMPT, completion), abs=1e-4)
        ranks = ray.get([w.call.remote("logprob", PROMPT, GOOD) for w in group.workers])
        assert ranks[0] == pytest.approx(ranks[1], abs=1e-6)  # no drift between the copies
        # one row in all: 'blue' is the shared start of both answers, so only ', like the sky' is trained;
        # rank 1 has no row of its own and must still join the reduction (else rank 0 would wait forever)
        one_row = [_group([(GOOD, 1.0), ({"role": "assistant", "content": "blue, like the sky"}, 0.0)])]
        expected, got = one.step(one_row), group.step(one_row)
        assert expected["tokens"] > 0 and got["tokens"] == expected["tokens"]
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
        assert group.logprob(PROMPT, GOOD) == pytest.approx(one.logprob(PROMPT, GOOD), abs=1e-4)
        assert group.progress() == 3
        state = group.save_state(tmp_path / "state")
        resumed = Learner(tiny, CFG, init=state)  # a group's state is a learner's state
        assert resumed.progress() == 3
        assert resumed.logprob(PROMPT, GOOD) == pytest.approx(group.logprob(PROMPT, GOOD), abs=1e-5)
    finally:
        group.stop()
    assert group.workers == []


def _same(got: dict, expected: dict) -> None:
    for key in ("rollouts", "tokens", "zero_variance_groups", "step", "stale"):
        assert got[key] == expected[key], key
    for key in ("loss", "grad_norm", "ratio_dev", "clipped"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_workers_take_the_one_worker_updates_and_their_state_resumes_either_way(tiny, tmp_path, stage):
    """ZeRO shards the optimizer state (and under stage 3 the weights); the updates stay the single learner's,
    also off-policy (the served weights swapped in through the shards) and with a rank that has no row of its
    own (it runs an empty micro-batch: ZeRO's passes are collectives). The moments are saved whole: a plain
    learner resumes a ZeRO group's state and a ZeRO group a plain learner's, with the same next update."""
    zero = dataclasses.replace(CFG, zero_stage=stage)
    one = Learner(tiny, CFG)
    group = ray_learner(tiny, zero, 0, 0, None, workers=2)
    try:
        for _ in range(2):  # no new version served between them: the second update is off-policy
            _same(group.step(BATCH), one.step(BATCH))
        assert one.steps - one.served_step == 2
        one_row = [_group([(GOOD, 1.0), ({"role": "assistant", "content": "blue, like the sky"}, 0.0)])]
        _same(group.step(one_row), one.step(one_row))
        for served in (False, True):
            assert group.logprob(PROMPT, OTHER, served) == pytest.approx(one.logprob(PROMPT, OTHER, served), abs=1e-4)
        group.mark_served(), one.mark_served()
        plain = Learner(tiny, CFG, init=group.save_state(tmp_path / "zero-state"))
        expected = one.step(BATCH)
        _same(group.step(BATCH), expected)
        _same(plain.step(BATCH), expected)  # AdamW's moments came through: a fresh optimizer would step otherwise
        assert plain.logprob(PROMPT, GOOD) == pytest.approx(one.logprob(PROMPT, GOOD), abs=1e-4)
        one.save_state(tmp_path / "plain-state")
    finally:
        group.stop()
    resumed = ray_learner(tiny, zero, 0, 0, str(tmp_path / "plain-state"), workers=2)
    try:
        assert resumed.progress() == one.progress()
        _same(resumed.step(BATCH), one.step(BATCH))
        assert resumed.logprob(PROMPT, GOOD) == pytest.approx(one.logprob(PROMPT, GOOD), abs=1e-4)
    finally:
        resumed.stop()


def test_zero_needs_a_group():
    with pytest.raises(ValueError, match="zero_stage 2 shards over learner workers"):
        Learner("unused", dataclasses.replace(CFG, zero_stage=2))


def test_a_grpo_job_on_two_zero3_workers_syncing_every_second_update_serves_checkpoints_and_stops_them(
        tiny, tmp_path):
    """The job's calls on a ZeRO-3 group (every one a collective): update 1 (not served: sync every 2), update 2
    on stale rollouts (weighted through the shards), then version 2 on the pool, the state checkpointed whole."""
    from tests.unit.actors.dspy_side.test_reinforce import BASE, Pool, Rollouts, versions

    pool = Pool()
    lm = dspy.LM(BASE, engine=Rollouts(), provider=TandemProvider(pool, adapter_root=tmp_path), cache=False)
    settings = {"lr": 5e-3, "rank": 8, "alpha": 16, "groups_per_step": 2, "learner_workers": 2, "learner_cpus": 0,
                "threads": 1, "zero_stage": 3, "sync_every": 2}
    with pytest.raises(ValueError, match="zero_stage 3 shards over learner workers: set learner_workers >= 2"):
        TandemReinforceJob(lm, {**settings, "learner_workers": 1})
    job = TandemReinforceJob(lm, settings, job_id="grpo-01", state_dir=tmp_path / "state")
    job.initialize()
    try:
        assert isinstance(job.learner, LearnerGroup)
        first, second = job.step(BATCH, "grpo_chat"), job.step(BATCH, "grpo_chat")
        assert (first["stale"], second["stale"]) == (0, 1) and second["ratio_dev"] > 0
        assert second["tokens"] > 0 and versions([lm.model]) == [f"{BASE}:grpo-01-v2"]
        assert [name for name, _ in pool.loaded] == [lm.model]  # v1 never reached the pool
        assert (tmp_path / "grpo-01-v2" / "adapter_config.json").is_file()  # rank 0 saved what the pool loads
        assert Learner(tiny, CFG, init=tmp_path / "state" / "learner").progress() == 2
        workers = job.learner.workers
    finally:
        job.terminate()
    assert job.learner is None
    for worker in workers:  # every rank's actor is gone
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(worker.call.remote("progress"))


def test_a_group_of_one_is_refused():
    with pytest.raises(ValueError, match=">= 2 workers"):
        LearnerGroup("unused", CFG, workers=1, cpus=0, gpus=0)
