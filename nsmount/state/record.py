"""Launch records: what nsmount built for a VM, kept under the state dir.

``<state>/vms/<pid>.json`` holds the pid, its start time (so a reused pid is never
mistaken for the VM), the spec, the submounts preserved at launch, the identity of
the mount namespace nsmount made (``mntns``: st_dev, st_ino of ``/proc/PID/ns/mnt``)
and of the ``/dev`` tmpfs it built (``dev``: its st_dev).  Later runs refuse a VM
whose namespace is not the recorded one and write only into the recorded ``/dev``.
Records are read as untrusted files (:mod:`nsmount.state.files`): a record whose file
name and content disagree on the pid is refused.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from .files import MAX_RECORD, read_state_text
from ..model.spec import VmSpec

DEFAULT_STATE_DIR = "/run/nsmount"


def state_dir(override: str | None = None) -> str:
    """``--state-dir``, else ``$NSMOUNT_STATE_DIR``, else /run/nsmount for root and the
    user's runtime directory for anyone else (:func:`user_state_dir`)."""
    return override or os.environ.get("NSMOUNT_STATE_DIR") or (
        DEFAULT_STATE_DIR if os.geteuid() == 0 else user_state_dir())


def user_state_dir(uid: int | None = None) -> str:
    """A non-root user's state dir (rootless launches): ``$XDG_RUNTIME_DIR/nsmount``,
    else ``/run/user/UID/nsmount``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/"):
        return os.path.join(xdg, "nsmount")
    return f"/run/user/{os.getuid() if uid is None else uid}/nsmount"


@dataclass(frozen=True)
class Record:
    pid: int
    starttime: int
    spec: VmSpec
    submounts: tuple[str, ...] = ()
    mntns: tuple[int, int] | None = None  # (st_dev, st_ino) of the namespace
    dev: int | None = None  # st_dev of the /dev tmpfs nsmount built
    #: rootless launch: (st_dev, st_ino) of the user namespace that owns ``mntns``
    userns: tuple[int, int] | None = None

    def to_json(self) -> str:
        d: dict[str, Any] = {"pid": self.pid, "starttime": self.starttime,
                             "spec": self.spec.to_dict(), "submounts": list(self.submounts)}
        if self.mntns is not None:
            d["mntns"] = list(self.mntns)
        if self.dev is not None:
            d["dev"] = self.dev
        if self.userns is not None:
            d["userns"] = list(self.userns)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Record:
        try:
            d: Any = json.loads(text)
            ns = d.get("mntns")
            dev = d.get("dev")
            uns = d.get("userns")
            return cls(pid=int(d["pid"]), starttime=int(d["starttime"]),
                       spec=VmSpec.from_dict(d["spec"], source="record"),
                       submounts=tuple(str(s) for s in d.get("submounts", ())),
                       mntns=(int(ns[0]), int(ns[1])) if ns is not None else None,
                       dev=int(dev) if dev is not None else None,
                       userns=(int(uns[0]), int(uns[1])) if uns is not None else None)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise SpecError(f"corrupt launch record: {exc}") from None


def record_path(pid: int, sdir: str | None = None) -> str:
    return os.path.join(state_dir(sdir), "vms", f"{pid}.json")


def open_subdir(sub: str, sdir: str | None = None) -> int:
    """O_PATH fd of ``<state>/<sub>``, created 0700; a symlink there (something planted
    it) raises OSError(ELOOP) instead of being followed."""
    d = os.path.join(state_dir(sdir), sub)
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(d, flags)  # there already (every VM after the first): no mkdir
    except OSError:
        pass  # missing, or not a directory: made, or explained, below
    os.makedirs(d, mode=0o700, exist_ok=True)
    try:
        return os.open(d, flags)
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
    """The record of ``pid``, None when there is none; SpecError when it is not a small
    regular file of valid JSON naming that same pid."""
    path = record_path(pid, sdir)
    try:
        text = read_state_text(path, limit=MAX_RECORD)
    except FileNotFoundError:
        return None
    try:
        rec = Record.from_json(text)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    if rec.pid != pid:
        raise SpecError(f"{path}: names pid {rec.pid}, not {pid} (file name and content "
                        "disagree); ignoring it")
    return rec


def remove(pid: int, sdir: str | None = None) -> None:
    """Drop the record of a VM that exited."""
    try:
        os.unlink(record_path(pid, sdir))
    except FileNotFoundError:
        pass


def scan(sdir: str | None = None) -> Iterator[tuple[int, Record | SpecError]]:
    """Every ``<pid>.json`` under the state dir: (pid, record) or (pid, why it is bad)."""
    d = os.path.join(state_dir(sdir), "vms")
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return
    for n in sorted(names):
        if not (n.endswith(".json") and n[:-5].isascii() and n[:-5].isdigit()
                and len(n) < 30):
            continue
        pid = int(n[:-5])
        try:
            rec = read(pid, sdir)
        except SpecError as exc:
            yield pid, exc
            continue
        if rec is not None:
            yield pid, rec
