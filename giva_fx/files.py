"""Atomic writes: a reader sees the old file (or directory) or the complete new one, never a half.

Everything is written under a temporary name beside its destination (same file system, so the final
`os.replace` is a rename) and only renamed into place once it is complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from giva_fx.errors import ExportError


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umask_mode(0o666))
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory; it becomes `path` only if the block succeeds.

    An existing `path` is refused unless `overwrite`, and then kept until the new one is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; pass overwrite=True to replace it (it is kept until "
                          "the new export has succeeded)")
    if path.exists() and not path.is_dir():
        raise ExportError(f"{path} exists and is not a directory; remove it or choose another out_dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # put the previous export back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
