"""Launch records: what nsmount built for a VM, kept under the state dir.

``<state>/vms/<pid>.json`` holds the pid, its start time (so a reused pid is never
mistaken for the VM), the spec and the submounts preserved at launch.  Later
repair/reconnect runs read it to know what the VM should have.
"""

from __future__ import annotations

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


def write(rec: Record, sdir: str | None = None) -> str:
    path = record_path(rec.pid, sdir)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(rec.to_json())
    os.replace(tmp, path)
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
