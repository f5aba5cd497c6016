"""Read a file from a state directory without trusting it.

State directories (nsmount's launch records, libvirt's ``<name>.pid`` and
``<name>.xml``) are written by daemons, but a file there may have been replaced by
anyone who could write the directory, or be left half-written: a FIFO (``open``
would block forever), a symlink to ``/dev/zero`` (``read`` would never end), a
directory, a 4 GiB file.  Every such read goes through :func:`read_state_file`: no
symlink followed, opened non-blocking, must be a regular file, size-capped.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import SpecError

#: caps: a launch record or a pid file is tiny; libvirt status XML of a big domain
#: is a few hundred KiB
MAX_PIDFILE = 64
MAX_RECORD = 1 << 20
MAX_XML = 8 << 20
_READ_CHUNK = 256 << 10


class StateFileError(SpecError):
    """A state file that is not a small regular file, or cannot be decoded."""


def read_state_file(path: str, *, limit: int, dir_fd: int | None = None) -> bytes:
    """The bytes of ``path``; FileNotFoundError when absent, StateFileError when it is
    not a regular file of at most ``limit`` bytes (or a symlink)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError(f"{path}: is a symlink; refusing to follow it") from None
        if exc.errno == errno.ENOENT:
            raise
        raise StateFileError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError(f"{path}: not a regular file ({_kind(st.st_mode)})")
        if st.st_size > limit:
            raise StateFileError(f"{path}: too large ({st.st_size} bytes, limit {limit})")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            # a bounded buffer: os.read(n) allocates n bytes up front, whatever comes
            chunk = os.read(fd, min(limit + 1 - size, _READ_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise StateFileError(f"{path}: too large (over {limit} bytes)")
        return b"".join(chunks)
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_state_text(path: str, *, limit: int, dir_fd: int | None = None) -> str:
    """:func:`read_state_file` decoded as UTF-8 (a decode error is a StateFileError)."""
    data = read_state_file(path, limit=limit, dir_fd=dir_fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"
