"""What one optimizer step of LoRA training does, on the tiny model (real torch + peft, CPU): the
accumulated gradient is the token mean over the whole window (a partial last one included), the
schedule's lr at warmup and end, clipping, the step count, and the effective batch refused when it
is not a whole number of micro-batches per worker."""

import math
import random

import pytest

from actors import models
from actors.training.guards import learnable
from actors.training.optim import clip_and_step, lr_factor, optimizer_steps, scheduler, window_tokens
from actors.training.config import LoraTrainConfig
from actors.training.loop import _build_model, _collate, _epochs, _Worker, buckets

PAD = 2


def _rows(completions: list[int], prompt: int = 6, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Synthetic (ids, labels) rows: ``prompt`` masked tokens, then a completion of each given length."""
    rng = random.Random(seed)
    rows = []
    for n in completions:
        ids = [rng.randrange(3, 2000) for _ in range(prompt + n)]
        rows.append((ids, [-100] * prompt + ids[prompt:]))
    return rows


def _worker(cfg: LoraTrainConfig, data: list) -> _Worker:
    import torch

    worker = _Worker(cfg, False, 0, 1, torch.device("cpu"), data, learnable([(len(i), 1) for i, _ in data], 64))
    worker.pad = PAD
    _build_model(worker, str(models.materialize(models.TINY)))
    return worker


class _Recorder:
    """An optimizer that leaves the weights alone and records the gradient it is asked to step with."""

    def __init__(self, params):
        self.params, self.grads, self.param_groups = list(params), [], [{"lr": 0.0}]

    def step(self):
        self.grads.append([p.grad.detach().clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _grad(model, params, rows, per_row_mean=False):
    """The gradient of the token-mean loss of ``rows`` as one batch (or, per_row_mean, of the mean of
    each row's own mean loss: what averaging micro-batch means gives)."""
    for p in params:
        p.grad = None
    batches = [[r] for r in rows] if per_row_mean else [rows]
    for batch in batches:
        ids, labels, mask = _collate(batch, PAD, "cpu")
        (model(input_ids=ids, attention_mask=mask, labels=labels).loss / len(batches)).backward()
    return [p.grad.detach().clone() for p in params]


def _gap(a, b) -> float:
    import torch

    return float(torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)) / sum((y ** 2).sum() for y in b)))


def test_accumulated_gradient_is_the_token_mean_over_the_window_and_the_last_partial_one():
    # 6 rows of very different completion lengths, one a micro-batch, windows of 4: steps of 4 and 2 rows
    data = _rows([1, 40, 2, 25, 3, 30])
    cfg = LoraTrainConfig(rank=4, alpha=8, epochs=1, batch_size=4, micro_batch_size=1, max_grad_norm=0,
                          warmup_ratio=0, lr_schedule="constant", cpus_per_worker=1, seed=3)
    worker = _worker(cfg, data)
    params = [p for p in worker.model.parameters() if p.requires_grad]
    worker.optim, worker.sched = _Recorder(params), None
    metrics = _epochs(worker)
    order = [b[0] for b in buckets([len(ids) for ids, _ in data], 1, cfg.seed)]
    windows = [[data[i] for i in order[:4]], [data[i] for i in order[4:]]]
    assert len(worker.optim.grads) == metrics["optimizer_steps"] == optimizer_steps(6, 1, 4, 1) == 2
    for got, rows in zip(worker.optim.grads, windows):
        want = _grad(worker.model, params, rows)
        assert _gap(got, want) < 1e-4
        assert _gap(_grad(worker.model, params, rows, per_row_mean=True), want) > 0.05  # the old loss differs
    all_rows = [r for rows in windows for r in rows]
    ids, labels, mask = _collate(all_rows, PAD, "cpu")
    loss = float(worker.model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach())
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)  # the reported loss is the token mean too


def test_the_loop_follows_the_schedule_and_reports_lr_and_grad_norm():
    data = _rows([5, 8, 3, 9, 4, 7, 6, 2])
    cfg = LoraTrainConfig(rank=4, alpha=8, epochs=3, lr=1e-3, batch_size=4, micro_batch_size=2, warmup_ratio=0.2,
                          lr_schedule="linear", cpus_per_worker=1)
    metrics = _epochs(_worker(cfg, data))
    total = optimizer_steps(8, 2, 2, 3)  # 2 steps an epoch
    assert metrics["optimizer_steps"] == total == 6
    assert metrics["lr_history"] == pytest.approx([cfg.lr * lr_factor(s, total, 2, "linear") for s in (1, 3, 5)])
    assert len(metrics["grad_norm_history"]) == 3 and metrics["grad_norm_last"] > 0
    assert metrics["loss_history"][-1] < metrics["loss_history"][0]


def test_warmup_rises_to_the_lr_and_each_schedule_ends_where_it_says():
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    for schedule, last in [("cosine", 0.5 * (1 + math.cos(math.pi * 7 / 8))), ("linear", 1 / 8), ("constant", 1.0)]:
        optim = torch.optim.SGD([param], lr=0.1)
        sched = scheduler(LoraTrainConfig(warmup_ratio=0.2, lr_schedule=schedule), total=10)(optim)
        lrs = []
        for _ in range(10):
            lrs.append(optim.param_groups[0]["lr"])
            optim.step()
            sched.step()
        assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])  # ceil(0.2 x 10) = 2 warmup steps, none at 0
        assert lrs[-1] == pytest.approx(0.1 * last) and lrs[-1] > 0
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert [lr_factor(s, 4, 0, "cosine") for s in range(4)][0] == 1.0  # no warmup: the first step is at lr


def test_clipping_bounds_the_norm_the_optimizer_steps_with_and_zero_turns_it_off():
    import torch

    for max_norm, expect in [(1.0, 1.0), (0.0, 10.0)]:
        param = torch.nn.Parameter(torch.zeros(2))
        param.grad = torch.tensor([6.0, 8.0])
        optim = _Recorder([param])
        model = torch.nn.Module()
        model.p = param
        assert clip_and_step(model, optim, None, max_norm) == pytest.approx(10.0)  # the norm before clipping
        assert float(optim.grads[0][0].norm()) == pytest.approx(expect, rel=1e-5)
        assert param.grad is None


def test_windows_count_only_tokens_that_get_a_loss():
    data = _rows([1, 4], prompt=3)
    from actors.training.optim import completion_tokens

    assert [completion_tokens(labels) for _, labels in data] == [1, 4]  # the label after the prompt is learned
    assert completion_tokens([5, 6, 7]) == 2  # the first label is never predicted
    assert window_tokens([3, 1, 4, 1, 5], accum=3) == [8, 6]


@pytest.mark.parametrize("batch, micro, workers, fix", [
    (8, 3, 1, "set batch_size to 6 or 9, or micro_batch_size to 2"),
    (8, 2, 3, "set batch_size to 6 or 12"),
    (2, 4, 1, "set batch_size to 4, or micro_batch_size to 2"),
])
def test_an_effective_batch_that_is_no_whole_number_of_micro_batches_is_refused(batch, micro, workers, fix):
    with pytest.raises(ValueError) as err:
        LoraTrainConfig(batch_size=batch, micro_batch_size=micro, num_workers=workers)
    text = str(err.value)
    assert f"batch_size={batch}" in text and f"micro_batch_size={micro}" in text
    assert f"num_workers={workers} = {micro * workers}" in text and text.endswith(fix)
    LoraTrainConfig(batch_size=micro * workers * 3, micro_batch_size=micro, num_workers=workers)  # a multiple is fine
