"""GRPO's learner on the tiny random Llama (real torch and peft, in this process): advantages, an update
that moves probability towards the rewarded completion and away from the others, zero-variance
groups that teach nothing, the KL penalty to the base model, a hot-loadable adapter."""

import json

import pytest

from actors import models
from actors.training.grpo import GRPOConfig, Learner, advantages, shared_ends

PROMPT = [{"role": "user", "content": "Say a colour."}]
GOOD, BAD = {"role": "assistant", "content": "blue"}, {"role": "assistant", "content": "seventeen horses"}


@pytest.fixture(scope="module")
def tiny():
    return str(models.materialize(models.TINY))


def _group(rewards_by_completion, batch_id=0):
    return {"batch_id": batch_id, "group": [{"messages": PROMPT, "completion": c, "reward": r}
                                            for c, r in rewards_by_completion]}


def test_advantages_are_group_relative_and_scaled_unless_told_not_to():
    assert advantages([1.0, 0.0, 0.0, 1.0]) == [1.0, -1.0, -1.0, 1.0]
    assert advantages([1.0, 0.0, 0.0, 1.0], scale=False) == [0.5, -0.5, -0.5, 0.5]
    assert advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]


def test_only_the_span_where_a_groups_completions_differ_is_trained():
    """A constrained layout's scaffolding (the same tokens before and after the choice in every rollout) is
    no choice of the policy: trained on, the tiny model learned what follows 'blue', not to say 'blue'."""
    assert shared_ends([[1, 2, 7, 9, 5], [1, 2, 8, 9, 5], [1, 2, 6, 6, 9, 5]]) == (2, 2)
    assert shared_ends([[1, 2], [1, 2]]) == (2, 0)  # identical completions: nothing differs
    assert shared_ends([[4, 5, 6]]) == (0, 0)  # a lone rollout: all of it


def test_a_step_moves_probability_to_the_rewarded_completion(tiny):
    learner = Learner(tiny, GRPOConfig(lr=5e-3, rank=8, alpha=16))
    before = learner.logprob(PROMPT, GOOD) - learner.logprob(PROMPT, BAD)
    for _ in range(3):
        metrics = learner.step([_group([(GOOD, 1.0), (BAD, 0.0), (GOOD, 1.0), (BAD, 0.0)])])
        learner.mark_served()  # each update's version samples the next rollouts: on-policy
    after = learner.logprob(PROMPT, GOOD) - learner.logprob(PROMPT, BAD)
    assert after > before + 0.5  # the rewarded answer gained on the other
    assert metrics["step"] == 3 and metrics["rollouts"] == 4 and metrics["reward_mean"] == 0.5
    assert metrics["tokens"] > 0 and metrics["zero_variance_groups"] == 0
    assert metrics["stale"] == 0 and metrics["ratio_dev"] == 0.0 and metrics["clipped"] == 0.0


def test_the_tokens_the_replica_sampled_are_trained_not_a_retokenization_of_their_text(tiny):
    """A sampler may emit a word in pieces that tokenizing its text again would merge: the learner trains on
    the sampled ids (and counts the rollouts whose text would re-tokenize otherwise)."""
    learner = Learner(tiny, GRPOConfig(lr=5e-3, rank=8, alpha=16))
    tok = learner.tokenizer
    canonical = tok.encode("blue", add_special_tokens=False)
    pieces = [i for ch in "blue" for i in tok.encode(ch, add_special_tokens=False)]  # one token per letter
    assert pieces != canonical
    ids, prompt = learner.encode(PROMPT, GOOD, pieces + [tok.eos_token_id])
    assert ids[prompt:] == pieces + [tok.eos_token_id]
    assert ids[:prompt] == tok.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert learner.retokenizes_differently(GOOD, pieces + [tok.eos_token_id])
    assert not learner.retokenizes_differently(GOOD, canonical + [tok.eos_token_id])
    group = _group([(GOOD, 1.0), (BAD, 0.0)])
    group["group"][0]["completion_ids"] = pieces + [tok.eos_token_id]
    metrics = learner.step([group])
    assert metrics["sampled_ids"] == 1 and metrics["retokenized_differ"] == 1


def test_rollouts_of_an_older_version_are_weighted_by_the_clipped_importance_ratio(tiny):
    """Two updates without a new version on the replicas: the third update's rollouts came from the starting
    policy, so each token is weighted by p_now / p_served (the served weights are the starting ones, exactly),
    and once the rewarded answer has gained more than clip_eps the clip holds its tokens (no gradient there)."""
    batch = [_group([(GOOD, 1.0), (BAD, 0.0), (GOOD, 1.0), (BAD, 0.0)])]
    start = Learner(tiny, GRPOConfig(lr=5e-3, rank=8, alpha=16))
    learner = Learner(tiny, GRPOConfig(lr=5e-3, rank=8, alpha=16, clip_eps=0.05))
    first = learner.step(batch)
    assert first["stale"] == 0 and first["ratio_dev"] == 0.0  # the starting policy sampled them: on-policy
    learner.step(batch)
    assert learner.logprob(PROMPT, GOOD, served=True) == pytest.approx(start.logprob(PROMPT, GOOD), abs=1e-5)
    assert learner.logprob(PROMPT, GOOD) > start.logprob(PROMPT, GOOD) + 0.1  # the policy moved; served did not
    third = learner.step(batch)
    assert third["stale"] == 2 and third["ratio_dev"] > 0.05
    assert 0.0 < third["clipped"] <= 1.0  # the rewarded tokens are past 1 + clip_eps: held
    wide = Learner(tiny, GRPOConfig(lr=5e-3, rank=8, alpha=16, clip_eps=100.0))
    wide.step(batch), wide.step(batch)
    assert wide.step(batch)["clipped"] == 0.0
    learner.mark_served()  # the replicas got the current version: on-policy again
    assert learner.logprob(PROMPT, GOOD, served=True) == learner.logprob(PROMPT, GOOD)
    assert learner.step(batch)["stale"] == 0


def test_a_group_with_equal_rewards_teaches_nothing(tiny):
    learner = Learner(tiny, GRPOConfig(lr=5e-3, rank=8, alpha=16))
    before = learner.logprob(PROMPT, GOOD)
    metrics = learner.step([_group([(GOOD, 1.0), (BAD, 1.0)]), _group([(GOOD, 0.0), (BAD, 0.0)], 1)])
    assert metrics["zero_variance_groups"] == 2 and metrics["tokens"] == 0 and metrics["loss"] == 0.0
    assert learner.logprob(PROMPT, GOOD) == before  # no update


def test_the_kl_to_the_base_model_is_zero_at_first_and_grows_as_the_adapter_moves(tiny):
    learner = Learner(tiny, GRPOConfig(lr=5e-3, rank=8, alpha=16, beta=0.1, loss="token"))
    first = learner.step([_group([(GOOD, 1.0), (BAD, 0.0)])])
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # peft starts with B = 0: the policy is the base model
    later = learner.step([_group([(GOOD, 1.0), (BAD, 0.0)])])
    assert later["kl"] > 0.0


def test_the_adapter_is_saved_for_the_pool_to_load(tiny, tmp_path):
    learner = Learner(tiny, GRPOConfig(rank=8, alpha=16))
    path = learner.save(tmp_path / "v1")
    config = json.loads((tmp_path / "v1" / "adapter_config.json").read_text())
    assert path == str(tmp_path / "v1") and config["r"] == 8 and (tmp_path / "v1" / "adapter_model.safetensors").is_file()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="loss must be one of"):
        GRPOConfig(loss="ppo")
    with pytest.raises(ValueError, match="beta >= 0"):
        GRPOConfig(beta=-1.0)


def test_a_learner_resumed_from_its_saved_state_takes_the_same_next_step(tiny, tmp_path):
    """save_state keeps the adapter, AdamW's moments and the step count (safetensors + JSON): the resumed
    learner's next update is the uninterrupted one's. A fresh optimizer (moments lost) would move differently."""
    batch = [_group([(GOOD, 1.0), (BAD, 0.0), (GOOD, 0.0), (BAD, 1.0), (GOOD, 1.0)])]
    cfg = GRPOConfig(lr=5e-3, rank=8, alpha=16)
    first = Learner(tiny, cfg)
    first.step(batch)
    first.step(batch)
    first.save_state(tmp_path / "state")
    assert not (tmp_path / "state.tmp").exists() and not (tmp_path / "state.old").exists()
    resumed = Learner(tiny, cfg, init=tmp_path / "state")
    adapter_only = Learner(tiny, cfg, init=first.save(tmp_path / "adapter"))  # the policy, not the optimizer
    assert resumed.progress() == 2 and adapter_only.progress() == 0
    assert resumed.logprob(PROMPT, GOOD) == pytest.approx(first.logprob(PROMPT, GOOD), abs=1e-6)
    for learner in (first, resumed, adapter_only):
        learner.step(batch)
    assert resumed.logprob(PROMPT, GOOD) == pytest.approx(first.logprob(PROMPT, GOOD), abs=1e-5)
    assert abs(adapter_only.logprob(PROMPT, GOOD) - first.logprob(PROMPT, GOOD)) > 1e-3
    first.save_state(tmp_path / "state")  # over an earlier state: replaced whole
    assert Learner(tiny, cfg, init=tmp_path / "state").progress() == 3
