"""libvirt's ``qemu.conf``: the settings that decide what a VM's /dev and hugepage
directories look like (pure parser; :mod:`nsmount.state.libvirtspec` loads the file).

The syntax is libvirt's virConf: ``name = value`` entries separated by newlines or
``;``, ``#`` comments, values that are strings (``"..."`` or ``'...'``), integers
or lists ``[ v, v, ]`` that may span lines.  Every entry is parsed (so a broken
line anywhere is reported, as libvirtd would refuse the file), and these are kept:

* ``cgroup_device_acl`` (list of paths): replaces the default node list;
* ``hugetlbfs_mount`` (a path or a list): the hugetlbfs mounts libvirt uses
  instead of every hugetlbfs mount in the mount table; ``""`` / ``[]`` = none;
* ``user`` / ``group``: who QEMU runs as, owner of the per-domain directories
  (names or ``+N``; resolved by the loader).

A malformed file raises :class:`QemuConfError` naming the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError

MAX_CONF_BYTES = 1 << 20
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_INT = re.compile(r"-?[0-9]{1,19}")


class QemuConfError(SpecError):
    """A malformed qemu.conf (one line, naming the file and line)."""


@dataclass(frozen=True)
class QemuConf:
    cgroup_device_acl: tuple[str, ...] | None = None
    hugetlbfs_mount: tuple[str, ...] | None = None
    user: str | None = None
    group: str | None = None
    path: str = "qemu.conf"


class _Lexer:
    def __init__(self, text: str, filename: str) -> None:
        self.text, self.filename = text, filename
        self.pos, self.line = 0, 1

    def error(self, msg: str, line: int | None = None) -> QemuConfError:
        return QemuConfError(f"{self.filename}:{line or self.line}: {msg}")

    def skip(self, newlines: bool) -> None:
        """Blanks and comments; newlines too when ``newlines`` (inside a list)."""
        t = self.text
        while self.pos < len(t):
            ch = t[self.pos]
            if ch == "#":
                end = t.find("\n", self.pos)
                self.pos = len(t) if end < 0 else end
            elif ch in " \t\r" or (newlines and ch == "\n"):
                if ch == "\n":
                    self.line += 1
                self.pos += 1
            else:
                return

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def name(self) -> str:
        m = _NAME.match(self.text, self.pos)
        if m is None:
            raise self.error(f"expected a setting name, found {self._near()}")
        self.pos = m.end()
        return m.group(0)

    def _near(self) -> str:
        frag = self.text[self.pos:self.pos + 20].split("\n", 1)[0]
        return repr(frag) if frag else "end of line"

    def value(self, depth: int = 0) -> Any:
        ch = self.peek()
        if ch in ("'", '"'):
            end = self.text.find(ch, self.pos + 1)
            nl = self.text.find("\n", self.pos + 1)
            if end < 0 or (0 <= nl < end):
                raise self.error("unterminated string")
            s = self.text[self.pos + 1:end]
            self.pos = end + 1
            return s
        if ch == "[":
            if depth:
                raise self.error("nested lists are not allowed")
            self.pos += 1
            start = self.line
            items: list[Any] = []
            while True:
                self.skip(newlines=True)
                if self.peek() == "]":
                    self.pos += 1
                    return items
                if self.peek() == "":
                    raise self.error("unterminated list", start)
                items.append(self.value(depth + 1))
                self.skip(newlines=True)
                if self.peek() == "":
                    raise self.error("unterminated list", start)
                if self.peek() == ",":
                    self.pos += 1
                elif self.peek() != "]":
                    raise self.error(f"expected ',' or ']' in a list, found {self._near()}")
        m = _INT.match(self.text, self.pos)
        if m is None:
            raise self.error(f"expected a string, number or list, found {self._near()}")
        self.pos = m.end()
        return int(m.group(0))


def parse_entries(text: str, filename: str = "qemu.conf") -> dict[str, tuple[Any, int]]:
    """Every ``name = value`` entry: name -> (value, line).  Later entries win."""
    if not isinstance(text, str):
        raise QemuConfError(f"{filename}: not text")
    if len(text) > MAX_CONF_BYTES:
        raise QemuConfError(f"{filename}: larger than {MAX_CONF_BYTES} bytes")
    lx = _Lexer(text, filename)
    out: dict[str, tuple[Any, int]] = {}
    while True:
        lx.skip(newlines=True)
        if lx.peek() == ";":
            lx.pos += 1
            continue
        if lx.peek() == "":
            return out
        line = lx.line
        name = lx.name()
        lx.skip(newlines=False)
        if lx.peek() != "=":
            raise lx.error(f"expected '=' after {name!r}")
        lx.pos += 1
        lx.skip(newlines=False)
        out[name] = (lx.value(), line)
        lx.skip(newlines=False)
        if lx.peek() not in ("\n", ";", ""):
            raise lx.error(f"unexpected {lx._near()} after the value of {name!r}")


def parse_qemu_conf(text: str, filename: str = "qemu.conf") -> QemuConf:
    entries = parse_entries(text, filename)

    def strings(key: str, allow_single: bool) -> tuple[str, ...] | None:
        if key not in entries:
            return None
        val, line = entries[key]
        if isinstance(val, str) and allow_single:
            return (val,) if val else ()
        if isinstance(val, list) and all(isinstance(v, str) for v in val):
            return tuple(v for v in val if v)
        raise QemuConfError(f"{filename}:{line}: {key} must be a "
                            f"{'string or ' if allow_single else ''}list of strings")

    def string(key: str) -> str | None:
        if key not in entries:
            return None
        val, line = entries[key]
        if not isinstance(val, str):
            raise QemuConfError(f"{filename}:{line}: {key} must be a string")
        return val or None

    return QemuConf(cgroup_device_acl=strings("cgroup_device_acl", False),
                    hugetlbfs_mount=strings("hugetlbfs_mount", True),
                    user=string("user"), group=string("group"), path=filename)
