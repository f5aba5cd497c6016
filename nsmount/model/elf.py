"""The one fact ``run-in`` needs from an executable: is it ELF, and which dynamic
loader (``PT_INTERP``) does the kernel start for it.

The kernel looks the loader up by path in the namespace the process execs in, so
for a binary executed inside a VM the loader is the VM's file unless it is proven
to be the host's (see :func:`nsmount.faces.repair.run_in`).
"""

from __future__ import annotations

import struct

from ..errors import CommandNotFoundError

PT_INTERP = 3


def interpreter(head: bytes) -> str | None:
    """``PT_INTERP`` of an ELF image whose first bytes are ``head`` (None: static);
    CommandNotFoundError when it is not ELF or the headers are not in ``head``."""
    if head[:4] != b"\x7fELF":
        raise CommandNotFoundError("not an ELF executable (a script's interpreter would be "
                                   "looked up inside the VM)")
    is64 = head[4] == 2
    endian = "<" if head[5] == 1 else ">"
    try:
        if is64:
            phoff, = struct.unpack_from(endian + "Q", head, 0x20)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        else:
            phoff, = struct.unpack_from(endian + "I", head, 0x1C)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x2A)
        for i in range(phnum):
            off = phoff + i * phentsize
            if is64:
                p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
                    endian + "IIQQQQ", head, off)
            else:
                p_type, p_offset, _va, _pa, p_filesz = struct.unpack_from(
                    endian + "IIIII", head, off)
            if p_type == PT_INTERP:
                raw = head[p_offset:p_offset + p_filesz]
                if len(raw) != p_filesz or not raw:
                    raise CommandNotFoundError("ELF loader path is outside the header")
                return raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
    except struct.error:
        raise CommandNotFoundError("truncated ELF headers") from None
    return None
