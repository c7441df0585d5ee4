"""Adapter files shipped by value: packed on the driver, written once per node, never mixed up."""

import pytest

from actors.inference import adapter_files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(adapter_files.ENV_ROOT, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _adapter(root, weights=b"w"):
    (root / "sub").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 8}')
    (root / "adapter_model.safetensors").write_bytes(weights)
    (root / "sub" / "extra.txt").write_text("x")
    return root


def test_a_packed_adapter_is_written_once_with_every_file(tmp_path, cache):
    source = _adapter(tmp_path / "a")
    files = adapter_files.pack(source)
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors", "sub/extra.txt"]
    local = adapter_files.materialize(files, source)
    assert local.parent == cache and local != source
    assert {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()} == files
    (local / "marker").write_text("kept")  # a second call finds the copy and leaves it alone
    assert adapter_files.materialize(files, source) == local and (local / "marker").is_file()
    assert not list(cache.glob(".staging-*"))


def test_other_content_or_another_source_never_shares_a_dir(tmp_path, cache):
    a = _adapter(tmp_path / "a")
    b = _adapter(tmp_path / "b")  # same bytes, other adapter
    first = adapter_files.materialize(adapter_files.pack(a), a)
    assert adapter_files.materialize(adapter_files.pack(b), b) != first
    (a / "adapter_model.safetensors").write_bytes(b"retrained")
    assert adapter_files.materialize(adapter_files.pack(a), a) != first


def test_a_missing_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter dir .*nope does not exist"):
        adapter_files.pack(tmp_path / "nope")
