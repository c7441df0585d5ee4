"""LoRA training faults on real Ray Train (2 CPUs) with the tiny model: rows with nothing to learn
are dropped and counted, and data with no such row is refused before any worker starts; a loss
that diverges to NaN/inf stops both DDP workers at once and writes no adapter; workers the cluster
can never hold are refused at once; workers whose CPUs someone else holds wait
``resource_wait_s``, then fail naming what they waited for."""

import time

import pytest
import ray

from actors.training.guards import NoCompletionError, NonFiniteLossError, ResourceWaitTimeout
from actors.training.loop import train_lora
from actors.training.rows import write_rows
from tests.integration.conftest import lora_b_moved, tiny_train_config

pytestmark = pytest.mark.integration

SHORT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "four, forty two"}]
LONG = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "four"}]  # prompt ~130 tokens


def _data(tmp_path, chats) -> str:
    path = tmp_path / "rows.parquet"
    write_rows([{"messages": m} for m in chats], path)
    return str(path)


def test_rows_without_a_completion_token_are_dropped_and_counted(ray_session, tiny_model, tmp_path):
    data = _data(tmp_path, [SHORT, LONG] * 4)
    cfg = tiny_train_config(max_seq_len=64, epochs=1)
    result = train_lora(cfg, tiny_model, data, str(tmp_path / "adapter"), str(tmp_path / "ray_train"), name="drop")
    assert result.metrics["rows_dropped_no_completion"] == 4 and result.metrics["examples"] == 4
    assert all(loss == loss for loss in result.metrics["loss_history"]) and lora_b_moved(result.adapter_path)


def test_data_with_no_completion_token_is_refused_before_any_worker_starts(ray_session, tiny_model, tmp_path):
    data = _data(tmp_path, [LONG] * 3)
    with pytest.raises(NoCompletionError, match=r"none of the 3 training rows .* max_seq_len=64.*longest prompt \d{3}"):
        train_lora(tiny_train_config(max_seq_len=64), tiny_model, data, str(tmp_path / "adapter"),
                   str(tmp_path / "ray_train"), name="none")
    assert not (tmp_path / "ray_train").exists() and not (tmp_path / "adapter").exists()  # Ray Train never ran


def test_a_diverging_loss_stops_every_worker_without_writing_an_adapter(ray_session, tiny_model, tmp_path):
    data = _data(tmp_path, [SHORT] * 16)
    cfg = tiny_train_config(lr=1e3, epochs=4, num_workers=2, batch_size=4, micro_batch_size=2)  # DDP: ranks agree
    with pytest.raises(NonFiniteLossError, match=r"epoch \d, micro-batch \d of 4: the loss is (nan|inf).*lora.lr=1000"):
        train_lora(cfg, tiny_model, data, str(tmp_path / "adapter"), str(tmp_path / "ray_train"), name="nan")
    assert not (tmp_path / "adapter").exists()


def test_workers_larger_than_the_cluster_are_refused_at_once(ray_session, tiny_model, tmp_path):
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"need 4 CPU \(1 x 4 CPU\) but the cluster has 2 CPU.*lora.cpus_per_worker"):
        train_lora(tiny_train_config(cpus_per_worker=4), tiny_model, _data(tmp_path, [SHORT]),
                   str(tmp_path / "adapter"), str(tmp_path / "ray_train"), name="big")
    assert time.monotonic() - started < 2


@ray.remote(num_cpus=2)
class _Holder:
    def ready(self) -> bool:
        return True


def test_busy_cpus_are_waited_for_resource_wait_s_then_named(ray_session, tiny_model, tmp_path):
    holder = _Holder.remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=60)
        started = time.monotonic()
        with pytest.raises(ResourceWaitTimeout, match=r"waited lora.resource_wait_s=5 s for 1 CPU .*free now 0 CPU"):
            train_lora(tiny_train_config(resource_wait_s=5), tiny_model, _data(tmp_path, [SHORT]),
                       str(tmp_path / "adapter"), str(tmp_path / "ray_train"), name="busy")
        assert 5 <= time.monotonic() - started < 20
    finally:
        ray.kill(holder)
