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
    (root / "run.lock").write_text(json.dumps({"host": "this-machine", "pid": 1}))  # names this machine's run


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


def test_pull_refreshes_a_stale_copy_and_keeps_newer_local_files(tmp_path):
    local, store = tmp_path / "run", tmp_path / "store"
    _run_dir(local)
    push(local, str(store))
    elsewhere = tmp_path / "node2"
    assert pull(str(store), elsewhere) is True
    (local / "02_w").mkdir()  # the first machine went on: a new step, a rewritten record
    (local / "02_w" / "step.json").write_text('{"score": 50}')
    (local / "best.json").write_text('{"best": "p -> w"}')
    push(local, str(store))
    (elsewhere / "01_p" / "note.txt").write_text("written here after the pull")
    assert pull(str(store), elsewhere) is True  # stale: the new step and record come over
    assert json.loads((elsewhere / "02_w" / "step.json").read_text()) == {"score": 50}
    assert json.loads((elsewhere / "best.json").read_text()) == {"best": "p -> w"}
    assert (elsewhere / "01_p" / "note.txt").read_text() == "written here after the pull"
    (elsewhere / "best.json").write_text('{"best": "p -> w -> p", "newer": true}')  # newer here
    assert pull(str(store), elsewhere) is False
    assert json.loads((elsewhere / "best.json").read_text())["newer"] is True


def test_push_copies_what_a_record_names_before_the_record(tmp_path, monkeypatch):
    from engine.store import remote

    local = tmp_path / "run"
    _run_dir(local)
    (local / "01_p" / "program.json").write_text("{}")
    (local / "best.json").write_text("{}")
    order = []
    real = remote._copy
    monkeypatch.setattr(remote, "_copy", lambda src, sfs, dst, dfs: (order.append(dst.split("/store/")[1]),
                                                                      real(src, sfs, dst, dfs)))
    push(local, str(tmp_path / "store"))
    assert order == ["adapters/m:ft/adapter_config.json", "01_p/program.json", "01_p/step.json", "best.json",
                     "run.json"]
    assert not list((tmp_path / "store").rglob("*.part-*"))  # every file landed whole under its name


def test_push_copies_only_what_is_not_stored_yet_or_changed_since(tmp_path):
    """A run pushes when it ends and when it stops, and a resumed run pushes again: stored adapters and
    steps are not uploaded again (they were, every time: the end of every run uploaded its run dir twice)."""
    local, store = tmp_path / "run", tmp_path / "store"
    _run_dir(local)
    assert push(local, str(store)) == 3
    assert push(local, str(store)) == 0  # nothing new
    (local / "best.json").write_text('{"best": "p"}')  # a new record
    (local / "run.json").write_text(json.dumps({"strategy": "p", "resumed": 1}))  # a rewritten one
    assert push(local, str(store)) == 2
    assert json.loads((store / "run.json").read_text())["resumed"] == 1
    (store / "01_p" / "step.json").write_text("")  # a stored copy cut short: another size, copied again
    assert push(local, str(store)) == 1 and (store / "01_p" / "step.json").read_text() == "{}"


def test_pull_refuses_keys_outside_the_run_dir():
    import pytest

    from engine.store.remote import _key

    assert str(_key("/s/run/01_p/step.json", "/s/run")) == "01_p/step.json"
    with pytest.raises(ValueError, match="not inside"):
        _key("/s/run/../../etc/passwd", "/s/run")
