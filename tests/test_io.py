"""pitchkeras.io: atomic writes whose files and directories get the modes a plain open()/mkdir() would give."""

import os
import stat

import pytest

from pitchkeras import io


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_files_get_the_umask_mode_not_mkstemp_0600(tmp_path, umask_027):
    io.atomic_write_text(tmp_path / "a.txt", "a\r\nb\n")
    io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    io.atomic_write_json(tmp_path / "c.json", {"genre": "Électronique"})
    with io.atomic_open(tmp_path / "d.csv", newline="") as f:
        f.write("x\n")
    with io.atomic_path(tmp_path / "e.png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    for name in ("a.txt", "b.bin", "c.json", "d.csv", "e.png"):
        assert _mode(tmp_path / name) == 0o640, name
    assert (tmp_path / "a.txt").read_bytes() == b"a\r\nb\n"  # line ends as given
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{\n  "genre": "Électronique"\n}\n'
    assert _leftovers(tmp_path) == []


def test_a_directory_gets_the_umask_mode_and_replaces_the_old_one(tmp_path, umask_027):
    target = tmp_path / "sub" / "model"
    with io.atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        os.mkdir(tmp / "assets")
    assert _mode(target) == 0o750 and _mode(target / "assets") == 0o750
    assert _mode(target / "config.json") == 0o640
    with io.atomic_directory(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _leftovers(target.parent) == []
    with pytest.raises(OSError):
        with io.atomic_directory(target) as tmp:  # without replace, an existing directory stays
            (tmp / "x").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = io.atomic_write_text(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError):
        with io.atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        with io.atomic_directory(tmp_path / "dir") as tmp:
            (tmp / "half").write_text("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert not (tmp_path / "dir").exists()
    assert _leftovers(tmp_path) == []


def test_several_files_commit_together(tmp_path):
    files = [io.AtomicFile(tmp_path / name) for name in ("train.csv", "val.csv")]
    for f in files:
        f.file.write("row\n")
    assert not (tmp_path / "train.csv").exists()
    for f in files:
        f.commit()
    assert (tmp_path / "val.csv").read_text() == "row\n"
    assert _leftovers(tmp_path) == []


def test_give_open_mode_and_the_umask_read_without_changing_it(tmp_path, umask_027):
    assert io.process_umask() == 0o027 and io.process_umask() == 0o027
    path = tmp_path / "private"
    path.write_bytes(b"")
    os.chmod(path, 0o600)
    io.give_open_mode(path)
    assert _mode(path) == 0o640
