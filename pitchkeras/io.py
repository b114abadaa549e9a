"""The one way pitchkeras writes a file or a directory: atomically, with the modes a plain `open()` would give.

Everything is written to a temporary sibling (a dot name in the same directory, so the rename never crosses a
file system), flushed with `fsync`, then renamed over the final name with `os.replace`, and the parent directory
is synced so the rename itself survives a crash. A reader sees the old file or the new one, never half of one;
a failed write leaves the old one in place and no temporary behind.

The temporaries are created the way `open(path, "w")` and `mkdir(path)` create files and directories: mode
`0o666` or `0o777` less the process umask. (`tempfile.mkstemp` and `mkdtemp` would leave `0600` and `0700`,
so a model that root imports in a container build would be unreadable to a server running as another user.)

    from pitchkeras import io

    io.atomic_write_json(out / "stats.json", stats)
    with io.atomic_open(out / "train.csv", newline="") as f:
        f.write(rows)
    with io.atomic_path(out / "loss.png") as tmp:      # for libraries that write by name
        fig.savefig(tmp)
    with io.atomic_directory(model_dir, replace=True) as tmp:
        causal_lm.save_to_preset(str(tmp))
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

#: The modes `open()` and `mkdir()` ask for; the umask takes its bits off both.
FILE_MODE = 0o666
DIRECTORY_MODE = 0o777
_ATTEMPTS = 100  # random temporary names tried before giving up (a clash is already a one-in-four-billion event)


def _temporary_name(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


def _create_file(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new, empty temporary sibling of `path`, opened for writing: (descriptor, name)."""
    for _ in range(_ATTEMPTS):
        tmp = _temporary_name(path, suffix)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _create_directory(path: Path) -> Path:
    """A new, empty temporary sibling directory of `path`."""
    for _ in range(_ATTEMPTS):
        tmp = _temporary_name(path)
        try:
            os.mkdir(tmp, DIRECTORY_MODE)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def process_umask() -> int:
    """The process umask, read without changing it where Linux shows it (`os.umask` alone must set it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_open_mode(path: str | os.PathLike) -> None:
    """Give a file another library created privately (safetensors writes `0600`) the mode `open()` would have."""
    os.chmod(path, FILE_MODE & ~process_umask())


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Sync every file and directory under `root` (libraries that write a directory rarely sync it)."""
    for folder, _, files in os.walk(root):
        for name in files:
            file = Path(folder, name)
            if file.is_file() and not file.is_symlink():
                _fsync_file(file)
        fsync_directory(folder)


class AtomicFile:
    """A file written under a temporary sibling name and renamed into place by `commit()`.

    Used as a context manager it yields the open file, commits on success and discards on an exception. Used
    directly it lets a writer keep several files open and commit them together (`tmp` names the temporary).

    Args:
        path: str or PathLike. The final name. Its parent directory is created if missing.
        mode: str. `"w"` (text) or `"wb"` (bytes).
        encoding: str. Text encoding (text mode only).
        newline: str or None. As for `open()`: `""` writes line ends untranslated (what the csv module wants).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8",
                 newline: Optional[str] = None):
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile mode must be 'w' or 'wb', not {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = _create_file(self.path)
        try:
            self.file = (os.fdopen(fd, "wb") if mode == "wb"
                         else os.fdopen(fd, "w", encoding=encoding, newline=newline))
        except BaseException:
            os.close(fd)
            self.tmp.unlink()
            raise

    def commit(self) -> Path:
        """Flush, sync and close the file, then rename it over `path`."""
        try:
            if not self.file.closed:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            else:
                _fsync_file(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_directory(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Close and delete the temporary; `path` is left as it was."""
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8",
                newline: Optional[str] = None) -> AtomicFile:
    """`with atomic_open(path) as f:` writes `path` atomically (see `AtomicFile`)."""
    return AtomicFile(path, mode, encoding=encoding, newline=newline)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; line ends are written as given. Returns `path`."""
    with atomic_open(path, encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically. Returns `path`."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: Optional[int] = 2) -> Path:
    """Write `value` as UTF-8 JSON (non-ASCII kept as is, a final newline) to `path` atomically. Returns `path`."""
    return atomic_write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name for a library that writes by name (`fig.savefig(tmp)`); renamed to `path` after.

    The temporary keeps `path`'s suffix, so writers that infer the format from it (matplotlib) still do. It
    exists already (empty, with the umask's mode), so the writer truncates it rather than creating it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_file(path, ".tmp" + path.suffix)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; once the block succeeds, its tree is synced and renamed to `path`.

    Args:
        path: str or PathLike. The final directory. Its parent is created if missing.
        replace: bool. Whether an existing `path` is replaced (moved aside, then deleted once the new one is in
            place). Without it an existing non-empty `path` makes the rename fail with `OSError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_directory(path)
    try:
        yield tmp
        _fsync_tree(tmp)
        if replace and path.exists():
            old = _temporary_name(path, ".old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)
