"""Entries nsmount puts in a VM's /dev: device nodes, symlinks and directories."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .display import escape_name

KINDS = {stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFDIR: "dir", stat.S_IFLNK: "lnk",
         stat.S_IFREG: "reg", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock"}
KIND_BITS = {v: k for k, v in KINDS.items()}


def kind_of(st_mode: int) -> str:
    return KINDS.get(stat.S_IFMT(st_mode), "unknown")


@dataclass(frozen=True)
class Entry:
    """One /dev entry as it is (observed) or should be (desired).

    ``mode`` holds permission bits only.  ``xattrs`` carries the POSIX ACL and the
    SELinux label copied from the host (empty where the host has none).
    """

    path: str
    kind: str  # chr, blk, lnk, dir, reg, fifo, sock
    major: int = 0
    minor: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    target: str | None = None  # for symlinks
    xattrs: tuple[tuple[str, bytes], ...] = field(default=(), compare=False)

    @property
    def is_device(self) -> bool:
        return self.kind in ("chr", "blk")

    @property
    def rdev(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def type_bits(self) -> int:
        return KIND_BITS[self.kind]

    @classmethod
    def from_stat(cls, path: str, st: os.stat_result, target: str | None = None,
                  xattrs: tuple[tuple[str, bytes], ...] = ()) -> Entry:
        kind = kind_of(st.st_mode)
        dev = kind in ("chr", "blk")
        return cls(path=path, kind=kind,
                   major=os.major(st.st_rdev) if dev else 0,
                   minor=os.minor(st.st_rdev) if dev else 0,
                   mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                   target=target, xattrs=xattrs)

    def describe(self) -> str:
        if self.kind == "lnk":
            return f"symlink -> {escape_name(self.target)}"
        if self.is_device:
            return (f"{self.kind} {self.major}:{self.minor} {self.mode:04o} "
                    f"{self.uid}:{self.gid}")
        return f"{self.kind} {self.mode:04o} {self.uid}:{self.gid}"

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"path": self.path, "kind": self.kind}
        if self.is_device:
            d.update(major=self.major, minor=self.minor)
        if self.kind == "lnk":
            d["target"] = self.target
        else:
            d.update(mode=f"{self.mode:04o}", uid=self.uid, gid=self.gid)
        return d
