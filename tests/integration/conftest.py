"""Shared fixtures for integration tests: one local Ray for the session, real models, adapters.

Pools are module-scoped so that one pool of vLLM engines runs at a time on small machines.
"""

import pytest
import ray

from actors import connect, models


@pytest.fixture(scope="session")
def ray_session():
    connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model():
    return str(models.materialize(models.TINY))


@pytest.fixture(scope="session")
def smollm2_model():
    return str(models.materialize(models.EMBEDDED))


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
