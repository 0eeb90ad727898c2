"""fsio: the one implementation of atomic file writes and directory publishing."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from dialclip_ray import fsio
from dialclip_ray.fsio import atomic_write, atomic_write_bytes, atomic_write_text, copy_dir_atomic, publish_dir, \
    staging_dir


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_atomic_write_replaces_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(target, "one") == target and target.read_text() == "one"
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write(target, lambda p: Path(p).write_text("three"))  # any writer that takes a path
    assert target.read_text() == "three" and listing(target.parent) == ["out.txt"]


def test_write_that_raises_midway_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("old")

    def half_then_fail(p: Path) -> None:
        p.write_text("half a fi")
        assert p.parent == tmp_path and p.name.startswith(".")  # hidden, beside the target
        raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="injected"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and listing(tmp_path) == ["meta.json"]
    def interrupted(p: Path) -> None:
        p.write_text("hal")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not only Exceptions: an interrupt cleans up too
        atomic_write(target, interrupted)
    assert target.read_text() == "old" and listing(tmp_path) == ["meta.json"]


def test_publish_dir_new_and_over_existing(tmp_path):
    out = tmp_path / "index"
    first = tmp_path / ".index.building-1"
    first.mkdir()
    (first / "a.txt").write_text("1")
    assert publish_dir(first, out) == out
    assert listing(out) == ["a.txt"] and not first.exists()

    second = tmp_path / ".index.building-2"
    second.mkdir()
    (second / "b.txt").write_text("2")
    publish_dir(second, out)
    assert listing(out) == ["b.txt"] and (out / "b.txt").read_text() == "2"
    assert listing(tmp_path) == ["index"]  # the old directory is gone, no temp left


def test_publish_dir_without_exchange_falls_back_and_restores(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)  # e.g. not Linux / fs without RENAME_EXCHANGE
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = tmp_path / ".out.new"
    new.mkdir()
    (new / "new.txt").write_text("new")
    publish_dir(new, out)
    assert listing(out) == ["new.txt"] and listing(tmp_path) == ["out"]

    # The second rename fails: the previous directory is put back.
    missing = tmp_path / ".out.vanished"
    with pytest.raises(FileNotFoundError):
        publish_dir(missing, out)
    assert listing(out) == ["new.txt"] and listing(tmp_path) == ["out"]


def test_publish_dir_replaces_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    new = tmp_path / ".out.new"
    new.mkdir()
    publish_dir(new, out)
    assert out.is_dir() and listing(tmp_path) == ["out"]


def test_staging_dir_publishes_on_success_and_removes_temp_on_error(tmp_path):
    out = tmp_path / "ds"
    with staging_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ds.")
        (tmp / "x").write_text("x")
        assert not out.exists()  # nothing at ``out`` until the block ends
    assert listing(out) == ["x"]

    with pytest.raises(RuntimeError, match="boom"):
        with staging_dir(out) as tmp:
            (tmp / "y").write_text("y")
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["ds"] and listing(out) == ["x"]  # temp removed, old output intact


def test_copy_dir_atomic(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_text("a")
    (src / "b").write_text("b")
    (src / "sub" / "c").write_text("c")
    copy_dir_atomic(src, tmp_path / "all")
    assert listing(tmp_path / "all") == ["a", "b", "sub"] and (tmp_path / "all" / "sub" / "c").read_text() == "c"
    copy_dir_atomic(src, tmp_path / "all", names=["b"])
    assert listing(tmp_path / "all") == ["b"]
    assert listing(tmp_path) == ["all", "src"]


def test_no_alias_left():
    assert not hasattr(fsio, "replace_dir")  # one name: publish_dir


# --- the train -> serve path: Ray's checkpoint copied to ``best/`` ---------------------------------------------


def _checkpoint(d: Path, tag: str) -> Path:
    from dialclip_ray.model.checkpoint import META_FILE, WEIGHTS_FILE

    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(tag.encode() * 100)
    (d / META_FILE).write_text(f'{{"tag": "{tag}"}}')
    (d / "ray_extra.pkl").write_text("not copied")
    return d


def test_copy_checkpoint_result_and_failure_keeps_old_best(tmp_path, monkeypatch):
    from dialclip_ray.model.checkpoint import META_FILE, WEIGHTS_FILE
    from dialclip_ray.train.run import _copy_checkpoint

    run = tmp_path / "run"
    best = run / "best"
    _copy_checkpoint(_checkpoint(tmp_path / "ck1", "one"), best)
    assert listing(best) == sorted([WEIGHTS_FILE, META_FILE]) and (best / META_FILE).read_text() == '{"tag": "one"}'

    real = shutil.copy2
    calls = []

    def failing(src, dst, *a, **k):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copy2", failing)
    with pytest.raises(OSError, match="injected"):
        _copy_checkpoint(_checkpoint(tmp_path / "ck2", "two"), best)
    monkeypatch.setattr(shutil, "copy2", real)
    assert (best / META_FILE).read_text() == '{"tag": "one"}' and (best / WEIGHTS_FILE).read_bytes() == b"one" * 100
    assert listing(run) == ["best"]  # no temp directory left behind

    _copy_checkpoint(tmp_path / "ck2", best)
    assert (best / META_FILE).read_text() == '{"tag": "two"}' and listing(run) == ["best"]


def test_copy_checkpoint_never_leaves_best_missing(tmp_path, monkeypatch):
    """Every rename/exchange step of replacing ``best/`` is observed: ``best/`` exists after each one."""
    from dialclip_ray.model.checkpoint import META_FILE
    from dialclip_ray.train.run import _copy_checkpoint

    best = tmp_path / "run" / "best"
    _copy_checkpoint(_checkpoint(tmp_path / "ck1", "one"), best)
    seen = []
    real_rename, real_exchange = os.rename, fsio._exchange

    def spy_rename(a, b, *args, **kwargs):
        real_rename(a, b, *args, **kwargs)
        seen.append(("rename", (best / META_FILE).is_file()))

    def spy_exchange(a, b):
        done = real_exchange(a, b)
        seen.append(("exchange" if done else "no-exchange", (best / META_FILE).is_file()))
        return done

    monkeypatch.setattr(fsio.os, "rename", spy_rename)
    monkeypatch.setattr(fsio, "_exchange", spy_exchange)
    _copy_checkpoint(_checkpoint(tmp_path / "ck2", "two"), best)
    monkeypatch.undo()
    assert (best / META_FILE).read_text() == '{"tag": "two"}'
    if not sys.platform.startswith("linux") or seen[:1] == [("no-exchange", True)]:
        pytest.skip(f"no renameat2(RENAME_EXCHANGE) here: publish_dir renames aside ({seen})")
    assert seen == [("exchange", True)]  # one atomic swap: best/ was never absent, no rename aside


def test_leftovers_of_killed_writers_are_swept_and_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    from dialclip_ray.fsio import atomic_write_text, staging_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname().replace("-", "_")
    stale_dir = tmp_path / f".out.building-{host}-{dead_pid}-abcd1234"
    stale_file = tmp_path / f".meta.json.w-{host}-{dead_pid}-abcd1234.tmp"
    live_dir = tmp_path / f".out.building-{host}-{os.getpid()}-efgh5678"
    other_host = tmp_path / f".out.building-elsewhere-{dead_pid}-ijkl9012"
    for d in (stale_dir, live_dir, other_host):
        d.mkdir()
        (d / "part.parquet").write_bytes(b"half")
    stale_file.write_text("{")
    with staging_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("1")
    atomic_write_text(tmp_path / "meta.json", "{}")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live_dir.exists() and other_host.exists()  # a live writer and another host's are not ours to remove
    assert (tmp_path / "out" / "done").read_text() == "1"
