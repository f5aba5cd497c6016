"""Launch records: what nsmount built for a VM, kept under the state dir.

``<state>/vms/<pid>.json`` holds the pid, its start time (so a reused pid is never
mistaken for the VM), the spec and the submounts preserved at launch.  Later
repair/reconnect runs read it to know what the VM should have.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from .spec import VmSpec

DEFAULT_STATE_DIR = "/run/nsmount"


def state_dir(override: str | None = None) -> str:
    return override or os.environ.get("NSMOUNT_STATE_DIR") or DEFAULT_STATE_DIR


@dataclass(frozen=True)
class Record:
    pid: int
    starttime: int
    spec: VmSpec
    submounts: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "starttime": self.starttime,
                           "spec": self.spec.to_dict(), "submounts": list(self.submounts)},
                          indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Record:
        try:
            d: Any = json.loads(text)
            return cls(pid=int(d["pid"]), starttime=int(d["starttime"]),
                       spec=VmSpec.from_dict(d["spec"], source="record"),
                       submounts=tuple(str(s) for s in d.get("submounts", ())))
        except (ValueError, KeyError, TypeError) as exc:
            raise SpecError(f"corrupt launch record: {exc}") from None


def record_path(pid: int, sdir: str | None = None) -> str:
    return os.path.join(state_dir(sdir), "vms", f"{pid}.json")


def open_subdir(sub: str, sdir: str | None = None) -> int:
    """O_PATH fd of ``<state>/<sub>``, created 0700; a symlink there (something planted
    it) raises OSError(ELOOP) instead of being followed."""
    d = os.path.join(state_dir(sdir), sub)
    os.makedirs(d, mode=0o700, exist_ok=True)
    try:
        return os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except NotADirectoryError:
        if os.path.islink(d):
            raise OSError(errno.ELOOP, "a symlink was planted here", d) from None
        raise


def write(rec: Record, sdir: str | None = None) -> str:
    path = record_path(rec.pid, sdir)
    dfd = open_subdir("vms", sdir)
    name = os.path.basename(path)
    tmp = f"{name}.tmp.{os.getpid()}"
    try:
        try:
            os.unlink(tmp, dir_fd=dfd)  # a stale (or planted) entry is removed, not followed
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        with open(fd, "w") as fh:
            fh.write(rec.to_json())
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)
    return path


def read(pid: int, sdir: str | None = None) -> Record | None:
    try:
        with open(record_path(pid, sdir)) as fh:
            return Record.from_json(fh.read())
    except FileNotFoundError:
        return None


def remove(pid: int, sdir: str | None = None) -> None:
    try:
        os.unlink(record_path(pid, sdir))
    except FileNotFoundError:
        pass


def scan(sdir: str | None = None) -> Iterator[Record]:
    d = os.path.join(state_dir(sdir), "vms")
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith(".json") and n[:-5].isdigit():
            try:
                with open(os.path.join(d, n)) as fh:
                    yield Record.from_json(fh.read())
            except (OSError, SpecError):
                continue
