"""The one reader of the files jdsearch reads whole: a regular file, at most a size limit.

Every text file (YAML specs, detectron2 configs and their ``_BASE_`` chain, JSON descriptions and
COCO annotation files, class-names files) is read through :func:`read_text` or
:func:`read_bytes`, so that ``/dev/zero``, a FIFO or ``/dev/stdin`` named as a file is refused
before a byte is read and a huge file before it fills memory. A refusal is an :class:`OSError`
(:class:`RefusedFile`) whose ``strerror`` says why, so a caller's ``except OSError`` reports it in
the same line as a missing file. Torch-free.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from jdsearch.core.limits import MAX_TEXT_BYTES, byte_size

__all__ = ["RefusedFile", "check_file", "read_bytes", "read_text"]

_CHUNK = 1 << 20  # what is read at a time beyond the size stat gave (a file that grew)


class RefusedFile(OSError):
    """A path refused before it is read: not a regular file, or larger than the limit."""


def _refuse(path: Path, code: int, why: str) -> RefusedFile:
    return RefusedFile(code, why, str(path))


def read_bytes(path: str | Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    Raises:
        FileNotFoundError, PermissionError, ...: the file cannot be opened.
        IsADirectoryError: ``path`` is a folder.
        RefusedFile: ``path`` is not a regular file (a device, a FIFO, a socket), or it holds more
            than ``limit`` bytes (checked before reading, and again while reading).
    """
    p = Path(path)
    _check_stat(p, os.stat(p), limit)  # before opening: opening a device or a FIFO can block
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        _check_stat(p, st, limit)  # the file opened, should it have changed
        # What stat says it holds, and a byte more to see whether it grew: read(limit + 1) would
        # allocate the limit (4 GiB for a checkpoint) whatever the file's size.
        data = f.read(st.st_size + 1)
        while len(data) <= limit and (more := f.read(_CHUNK)):
            data += more
    if len(data) > limit:
        raise _refuse(p, errno.EFBIG, f"larger than {byte_size(limit)}")
    return data


def check_file(path: str | Path, limit: int) -> Path:
    """``path``, checked as :func:`read_bytes` checks it (a regular file of at most ``limit``
    bytes), for a reader that opens the file itself (``torch.load``, an unpickler).

    Raises:
        As :func:`read_bytes`, before anything is opened.
    """
    p = Path(path)
    _check_stat(p, os.stat(p), limit)
    return p


def _check_stat(p: Path, st: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(p))
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(p, errno.EINVAL, "not a regular file")
    if st.st_size > limit:
        raise _refuse(p, errno.EFBIG, f"larger than {byte_size(limit)}")


def read_text(path: str | Path, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file at ``path`` (see :func:`read_bytes`).

    Raises:
        OSError: as :func:`read_bytes`.
        UnicodeDecodeError: the file is not UTF-8 text.
    """
    return read_bytes(path, limit).decode("utf-8")
