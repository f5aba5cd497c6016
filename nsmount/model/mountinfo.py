"""Parse /proc/<pid>/mountinfo into a mount tree with propagation state.

Format (proc(5)): ``id parent major:minor root mountpoint opts [optional...] - fstype
source superopts``.  Paths use octal escapes (``\\040`` space, ``\\012`` newline,
``\\134`` backslash); optional fields are ``shared:N``, ``master:N``,
``propagate_from:N`` and ``unbindable``.  Lines are read whole (the reference read
them into a 1024-byte buffer and truncated long paths).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from ..errors import SpecError

_OCTAL = re.compile(r"\\([0-7]{3})")


class MountinfoError(SpecError):
    """A mountinfo line that does not follow proc(5)."""


def unescape(field_: str) -> str:
    """Decode the kernel's octal escapes; bytes above 0x7f are UTF-8 (surrogateescape).

    ``field_`` is kernel bytes decoded as latin-1 (see :func:`read`), so the UTF-8
    re-decode must happen whether or not the field had an escape (a plain
    ``/mnt/é`` must not come back as mojibake).
    """
    if "\\" not in field_:
        if field_.isascii():
            return field_  # nothing escaped, nothing to re-decode: the common case
        raw = field_
    else:
        raw = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field_)
    try:
        return raw.encode("latin-1").decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return raw


def escape(path: str) -> str:
    """Inverse of :func:`unescape` for the characters the kernel escapes."""
    out = []
    for ch in path:
        if ch in " \t\n\\":
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    superoptions: str
    shared: int | None = None  # peer group id
    master: int | None = None  # master peer group id (slave)
    propagate_from: int | None = None
    unbindable: bool = False

    @property
    def dev(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def propagation(self) -> str:
        """'shared', 'slave', 'shared+slave', 'private' or 'unbindable'."""
        if self.unbindable:
            return "unbindable"
        if self.shared is not None and self.master is not None:
            return "shared+slave"
        if self.shared is not None:
            return "shared"
        if self.master is not None:
            return "slave"
        return "private"

    def option(self, name: str) -> str | None:
        """Value of a super-option (``pagesize=2M``); '' for a flag; None if absent."""
        for opt in self.superoptions.split(","):
            key, _, val = opt.partition("=")
            if key == name:
                return val
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.mount_id, "parent": self.parent_id, "dev": f"{self.major}:{self.minor}",
            "root": self.root, "target": self.mountpoint, "fstype": self.fstype,
            "source": self.source, "options": self.options, "super_options": self.superoptions,
            "propagation": self.propagation, "peer_group": self.shared, "master": self.master,
        }


def _is_id(text: str) -> bool:
    """A number mountinfo may hold: ASCII digits (``'²'.isdigit()`` is True but
    ``int('²')`` fails), at most 20 of them (``int()`` refuses > 4300 digits)."""
    return text.isascii() and text.isdigit() and len(text) <= 20


def _int(text: str, what: str, line: str) -> int:
    if not _is_id(text):
        raise MountinfoError(f"mountinfo: bad {what} {text!r} in line {line!r}")
    return int(text)


#: the first three fields of a well-formed line: ``id parent major:minor `` (ASCII
#: digits only, at most 20 each: what :func:`_int` accepts)
_HEAD = re.compile(r"(\d{1,20}) (\d{1,20}) (\d{1,20}):(\d{1,20}) ", re.ASCII)
_new_mount = object.__new__


#: parsed lines by everything after their two ids (see :func:`parse_line`); cleared
#: when full, so it holds at most this many, of lines no longer than _MEMO_LINE (a
#: VM names its own mount points: its long paths are parsed, never kept)
_MEMO: dict[str, dict[str, object]] = {}
_MEMO_MAX = 4096
_MEMO_LINE = 512


def parse_line(line: str) -> Mount:
    """One mountinfo line as a :class:`Mount`; MountinfoError when it is not proc(5).

    Remembered by what follows the two ids: the mount namespaces of many VMs on one
    host are copies of the host's, so most of their lines differ from a line seen
    before only in the mount and parent ids (a VM's table of ~20 lines was the largest
    single cost of looking at it).  Everything after the ids decides every other field
    and whether the line is well formed; the ids are checked as :func:`_int` does."""
    mid, _, rest = line.partition(" ")
    parent, _, tail = rest.partition(" ")
    known = _MEMO.get(tail)
    if known is not None and _is_id(mid) and _is_id(parent):
        m = _new_mount(Mount)
        d = known.copy()
        d["mount_id"], d["parent_id"] = int(mid), int(parent)
        object.__setattr__(m, "__dict__", d)
        return m
    m = _parse_line(line)
    if len(tail) <= _MEMO_LINE:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[tail] = m.__dict__
    return m


def _parse_line(line: str) -> Mount:
    """:func:`parse_line` without the memo.

    The common line (plain ASCII, no escapes, numbers well formed) takes a fast path
    whose checks are the same as :func:`_parse_line_checked`'s, done in one go (one
    regex for the four numbers of the head, one look at the whole line for escapes
    and non-ASCII); anything else -- every malformed line included -- goes through
    the field-by-field parser, which also words the error."""
    head = _HEAD.match(line)
    if head is None or "\\" in line or not line.isascii():
        return _parse_line_checked(line)
    parts = line[head.end():].split(" ")
    # parts: root mountpoint opts [optional...] - fstype source superopts...
    try:
        sep = parts.index("-", 3)
    except ValueError:
        return _parse_line_checked(line)
    if len(parts) < sep + 3:
        return _parse_line_checked(line)
    shared = master = pfrom = None
    unbindable = False
    for opt in parts[3:sep]:
        tag, _, val = opt.partition(":")
        if tag == "unbindable":
            unbindable = True
            continue
        if tag not in _OPTIONAL:
            continue  # unknown optional fields are ignored, as proc(5) asks
        if not (val.isdigit() and len(val) <= 20):  # the line is ASCII
            return _parse_line_checked(line)
        if tag == "shared":
            shared = int(val)
        elif tag == "master":
            master = int(val)
        else:
            pfrom = int(val)
    m = _new_mount(Mount)
    # a frozen dataclass's __init__ sets each field through object.__setattr__: the
    # same dict, built at once (the fields were decoded above: ASCII, no escapes)
    object.__setattr__(m, "__dict__", {
        "mount_id": int(head[1]), "parent_id": int(head[2]), "major": int(head[3]),
        "minor": int(head[4]), "root": parts[0], "mountpoint": parts[1],
        "options": parts[2], "fstype": parts[sep + 1], "source": parts[sep + 2],
        "superoptions": " ".join(parts[sep + 3:]), "shared": shared, "master": master,
        "propagate_from": pfrom, "unbindable": unbindable})
    return m


_OPTIONAL = frozenset({"shared", "master", "propagate_from"})


def _parse_line_checked(line: str) -> Mount:
    """:func:`parse_line` field by field, with the error naming the bad field."""
    parts = line.split(" ")
    try:
        sep = parts.index("-", 6)
    except ValueError:
        raise MountinfoError(f"mountinfo: no '-' separator in line {line!r}") from None
    if len(parts) < sep + 3 or sep < 6:
        raise MountinfoError(f"mountinfo: too few fields in line {line!r}")
    mid = _int(parts[0], "mount id", line)
    pid = _int(parts[1], "parent id", line)
    majmin = parts[2].split(":")
    if len(majmin) != 2:
        raise MountinfoError(f"mountinfo: bad major:minor {parts[2]!r}")
    major = _int(majmin[0], "major", line)
    minor = _int(majmin[1], "minor", line)
    shared = master = pfrom = None
    unbindable = False
    for opt in parts[6:sep]:
        tag, _, val = opt.partition(":")
        if tag == "shared":
            shared = _int(val, "peer group", line)
        elif tag == "master":
            master = _int(val, "master group", line)
        elif tag == "propagate_from":
            pfrom = _int(val, "propagate_from", line)
        elif tag == "unbindable":
            unbindable = True
        # unknown optional fields are ignored, as proc(5) asks
    fstype, source = parts[sep + 1], parts[sep + 2]
    superopts = " ".join(parts[sep + 3:])
    return Mount(
        mount_id=mid, parent_id=pid, major=major, minor=minor,
        root=unescape(parts[3]), mountpoint=unescape(parts[4]), options=parts[5],
        fstype=unescape(fstype), source=unescape(source), superoptions=superopts,
        shared=shared, master=master, propagate_from=pfrom, unbindable=unbindable,
    )


def parse(text: str) -> list[Mount]:
    """Parse a whole mountinfo text.  Raises :class:`MountinfoError` on bad input."""
    if not isinstance(text, str):
        raise MountinfoError("mountinfo: expected text")
    return [parse_line(line) for line in text.split("\n") if line.strip()]


def read(pid: int | str = "self") -> list[Mount]:
    """Read and parse ``/proc/<pid>/mountinfo`` of the caller's procfs (the host's: a
    VM's mount table is read through :meth:`nsmount.state.target.Target.mount_table`)."""
    with open(f"/proc/{pid}/mountinfo", encoding="latin-1") as fh:  # unescape() re-decodes
        return parse(fh.read())


@dataclass
class MountTree:
    """Mounts indexed by id, with children and the visible mount per path."""

    mounts: list[Mount]
    by_id: dict[int, Mount] = field(init=False)
    children: dict[int, list[Mount]] = field(init=False)
    _visible: list[Mount] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {m.mount_id: m for m in self.mounts}
        self.children = {}
        for m in self.mounts:
            if m.parent_id != m.mount_id:
                self.children.setdefault(m.parent_id, []).append(m)

    @classmethod
    def from_text(cls, text: str) -> MountTree:
        return cls(parse(text))

    def root(self) -> Mount | None:
        for m in self.mounts:
            if m.parent_id not in self.by_id or m.parent_id == m.mount_id:
                return m
        return None

    def at(self, path: str) -> list[Mount]:
        """All mounts whose mount point is ``path``, bottom first (stacking order)."""
        found = [m for m in self.mounts if m.mountpoint == path]
        # a mount stacked on another at the same path has that one as parent
        ordered: list[Mount] = []
        ids = {m.mount_id for m in found}
        bottom = [m for m in found if m.parent_id not in ids]
        while bottom:
            cur = bottom.pop()
            ordered.append(cur)
            bottom.extend(c for c in self.children.get(cur.mount_id, ()) if c.mountpoint == path)
        return ordered

    def visible(self) -> list[Mount]:
        """Mounts reachable from the root without being covered by a later mount.

        A mount is hidden when a later sibling mount sits on its mount point or on an
        ancestor directory of it (e.g. hugetlbfs propagated under a VM's old /dev that
        the VM's new /dev tmpfs covers), and when a mount is stacked on it at the same
        mount point (its child with its own mount point: two mounts at /proc, autofs
        under binfmt_misc): then only the top of the stack is reachable, and so are
        only the mounts made on that top.  "Later" is mountinfo order (mount order):
        mount ids are recycled and say nothing about age.  Linear in the number of
        mounts times path depth; computed once per tree.
        """
        if self._visible is not None:
            return self._visible
        root = self.root()
        out: list[Mount] = []
        stack = [root] if root is not None else []
        while stack:
            m = stack.pop()
            kids = self.children.get(m.mount_id, [])
            top = None
            for k in kids:
                if k.mountpoint == m.mountpoint:
                    top = k  # the last one stacked at the same place covers m
            if top is not None:
                stack.append(top)
                continue
            out.append(m)
            later: set[str] = set()
            keep: list[Mount] = []
            for k in reversed(kids):
                if not _covered_by(k.mountpoint, later):
                    keep.append(k)
                later.add(k.mountpoint)
            stack.extend(keep)  # reversed twice: children are walked in mount order
        self._visible = out
        return out

    def hidden(self) -> list[Mount]:
        """Mounts listed in the table that no path reaches (covered by another)."""
        vis = {m.mount_id for m in self.visible()}
        return [m for m in self.mounts if m.mount_id not in vis]


def _covered_by(path: str, later: set[str]) -> bool:
    """True when ``path`` or one of its ancestors is in ``later``."""
    return bool(later) and not later.isdisjoint(_self_and_ancestors(path))


@functools.lru_cache(maxsize=4096)
def _self_and_ancestors(path: str) -> frozenset[str]:
    """``path`` and every ancestor up to '/' (cached: every VM of a worker has the
    same few mount points)."""
    out = {path}
    cur = path
    while cur not in ("", "/"):
        cur = cur.rpartition("/")[0] or "/"
        out.add(cur)
    return frozenset(out)
