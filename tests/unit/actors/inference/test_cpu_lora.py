"""Tandem's grouped CPU LoRA ops give vLLM's results (vLLM's own torch ops are the reference)."""

import pytest
import torch
from vllm.lora.ops import torch_ops as ref

from actors.inference import cpu_lora as ours

T, H, R, O, SLOTS = 37, 24, 8, 40, 3


@pytest.fixture(params=["one adapter", "mixed adapters"])
def case(request):
    torch.manual_seed(0)
    x = torch.randn(T, H)
    a = torch.randn(SLOTS, 1, R, H)
    b = torch.randn(SLOTS, 1, O, R)
    if request.param == "one adapter":
        idx = torch.full((T,), 1, dtype=torch.long)
    else:
        idx = torch.randint(0, SLOTS, (T,))
    return x, a, b, idx


def test_shrink_and_expand_match_vllm(case):
    x, a, b, idx = case
    y_ref, y = torch.zeros(T, R), torch.zeros(T, R)
    ref.bgmv_shrink(x, a, y_ref, idx, 0.5)
    ours.bgmv_shrink(x, a, y, idx, 0.5)
    torch.testing.assert_close(y, y_ref)
    for add in (True, False):
        z_ref, z = torch.ones(T, O), torch.ones(T, O)
        ref.bgmv_expand(y_ref, b, z_ref, idx, add)
        ours.bgmv_expand(y, b, z, idx, add)
        torch.testing.assert_close(z, z_ref)
        s_ref, s = torch.ones(T, O + 10), torch.ones(T, O + 10)
        ref.bgmv_expand_slice(y_ref, b, s_ref, idx, 5, O, add)
        ours.bgmv_expand_slice(y, b, s, idx, 5, O, add)
        torch.testing.assert_close(s, s_ref)


def test_sequence_ops_explode_per_sequence_indices_like_vllm():
    torch.manual_seed(1)
    x, a, b = torch.randn(T, H), torch.randn(SLOTS, 1, R, H), torch.randn(SLOTS, 1, O, R)
    seq_lens, seq_idx = torch.tensor([10, 20, 7]), torch.tensor([2, 0, 2])
    meta = (torch.tensor([0, 10, 30]), seq_lens, seq_idx, 3, 20, T)
    y_ref, y = torch.zeros(T, R), torch.zeros(T, R)
    ref.sgmv_shrink(x, a, y_ref, *meta, 1.0)
    ours.sgmv_shrink(x, a, y, *meta, 1.0)
    torch.testing.assert_close(y, y_ref)
    z_ref, z = torch.zeros(T, O), torch.zeros(T, O)
    ref.sgmv_expand(y_ref, b, z_ref, *meta, True)
    ours.sgmv_expand(y, b, z, *meta, True)
    torch.testing.assert_close(z, z_ref)


def test_negative_index_means_no_lora():
    x, a, b = torch.randn(4, H), torch.randn(SLOTS, 1, R, H), torch.randn(SLOTS, 1, O, R)
    idx = torch.tensor([0, -1, 0, -1])
    y = torch.zeros(4, R)
    ours.bgmv_shrink(x, a, y, idx, 1.0)
    z = torch.ones(4, O)
    ours.bgmv_expand(y, b, z, idx, True)
    assert torch.equal(z[1], torch.ones(O)) and torch.equal(z[3], torch.ones(O))  # base rows untouched
    assert not torch.equal(z[0], torch.ones(O))


def test_register_rebinds_the_cpu_wrapper_and_the_plugin_is_installed():
    from importlib.metadata import entry_points

    from vllm.lora.punica_wrapper import punica_cpu

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("tandem_cpu_lora") == "actors.inference.cpu_lora:register"
    ours.register()
    ours.register()  # idempotent
    assert punica_cpu.sgmv_shrink is ours.sgmv_shrink and punica_cpu.bgmv_expand is ours.bgmv_expand
