"""Run-dir storage through pyarrow's filesystems (a real local filesystem URI)."""

import json

from engine.store.remote import pull, push


def _run_dir(root):
    (root / "01_p").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"strategy": "p"}))
    (root / "01_p" / "step.json").write_text("{}")
    (root / "02_w.tmp").mkdir()
    (root / "02_w.tmp" / "half.json").write_text("{}")
    (root / "adapters" / "m:ft").mkdir(parents=True)
    (root / "adapters" / "m:ft" / "adapter_config.json").write_text("{}")
    (root / "adapters" / ".ray_train" / "ckpt").mkdir(parents=True)
    (root / "adapters" / ".ray_train" / "ckpt" / "big.bin").write_bytes(b"x")


def test_push_keeps_finished_files_and_pull_restores_them(tmp_path):
    local, store = tmp_path / "run", tmp_path / "store"
    _run_dir(local)
    assert push(local, store.as_uri()) == 3
    kept = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
    assert kept == ["01_p/step.json", "adapters/m:ft/adapter_config.json", "run.json"]

    elsewhere = tmp_path / "node2" / "run"
    assert pull(str(store), elsewhere) is True  # a plain path works as well as a URI
    assert json.loads((elsewhere / "run.json").read_text()) == {"strategy": "p"}
    assert (elsewhere / "01_p" / "step.json").is_file()
    assert pull(str(store), elsewhere) is False  # a local run is never overwritten
    assert pull(str(tmp_path / "empty"), tmp_path / "fresh") is False
