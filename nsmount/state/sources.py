"""Where "what the VM should have" comes from, in order of trust.

1. an explicit ``--spec``/``--domain-xml`` from the admin;
2. nsmount's own launch record (pid and start time must match);
3. libvirt's status XML (``<domstatus pid=...>``) whose pid is the target;
4. the QEMU command line in ``/proc/PID/cmdline``.
The chosen source is reported, so the admin knows what the repair was based on.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..errors import NoRecordError, NoSuchProcessError, SpecError, TargetError
from . import record
from ..model.spec import VmSpec
from .files import MAX_PIDFILE, MAX_XML, read_state_file, read_state_text
from .target import Target

DEFAULT_LIBVIRT_STATE_DIR = "/run/libvirt/qemu"


def libvirt_state_dir(override: str | None = None) -> str:
    return (override or os.environ.get("NSMOUNT_LIBVIRT_STATE_DIR")
            or DEFAULT_LIBVIRT_STATE_DIR)


def read_pidfile(path: str) -> int:
    try:
        raw = read_state_file(path, limit=MAX_PIDFILE)
    except FileNotFoundError:
        raise TargetError(f"no libvirt state file {path}",
                          hint="is the domain running? check --libvirt-state-dir") from None
    text = raw.strip()
    if not (text.isdigit() and len(text) < 12):
        raise SpecError(f"{path}: not a pid: {text[:40]!r}")
    return int(text)


def libvirt_status(name: str, lvdir: str | None = None) -> tuple[int, VmSpec] | None:
    path = os.path.join(libvirt_state_dir(lvdir), f"{name}.xml")
    try:
        text = read_state_text(path, limit=MAX_XML)
    except FileNotFoundError:
        return None
    from .libvirtspec import spec_from_status_xml

    try:
        return spec_from_status_xml(text)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def resolve_target(arg: str, *, lvdir: str | None = None) -> tuple[int, str | None]:
    """'1234' / 'pid:1234' -> (1234, None); 'dom' -> (pid from libvirt's pid file, 'dom')."""
    text = arg.removeprefix("pid:")
    if text.isdigit():
        return int(text), None
    if arg.startswith("pid:") or not arg or "/" in arg or arg in (".", ".."):
        raise TargetError(f"bad target {arg!r}: expected PID, pid:N or a domain name")
    pid = read_pidfile(os.path.join(libvirt_state_dir(lvdir), f"{arg}.pid"))
    return pid, arg


def looks_like_qemu(cmdline: bytes) -> bool:
    argv0 = os.path.basename(cmdline.split(b"\0", 1)[0])
    return argv0.startswith(b"qemu-system-") or argv0 in (b"qemu-kvm", b"kvm")


def spec_for(target: Target, *, explicit: VmSpec | None = None, domain: str | None = None,
             lvdir: str | None = None, sdir: str | None = None) -> VmSpec:
    """The VmSpec for ``target`` from the most trusted available source."""
    rec = check_record(target, sdir)
    if explicit is not None:
        return explicit
    if rec is not None:
        return rec.spec
    if domain is not None:
        st = libvirt_status(domain, lvdir)
        if st is not None:
            pid, spec = st
            if pid != target.pid:
                raise TargetError(f"libvirt status of {domain} names pid {pid}, "
                                  f"not {target.pid}: stale or lying state file")
            return spec
    try:
        raw = target.cmdline()
    except PermissionError:
        raise NoRecordError(f"cannot read /proc/{target.pid}/cmdline") from None
    if not raw:
        raise NoSuchProcessError(f"pid {target.pid} has exited or is a kernel thread")
    if looks_like_qemu(raw):
        from ..model.qemu_cmdline import spec_from_proc_cmdline

        spec = spec_from_proc_cmdline(raw)
        return replace(spec, source="cmdline")
    raise NoRecordError(f"pid {target.pid} is not a QEMU process and nsmount has no record "
                        "of it")


def check_record(target: Target, sdir: str | None = None) -> record.Record | None:
    """nsmount's launch record of ``target`` (None when it has none, or the pid's record
    is of an earlier process); refuses a VM that left the recorded namespace and tells
    the target which /dev tmpfs nsmount built."""
    rec = record.read(target.pid, sdir)
    if rec is None or rec.starttime != target.starttime:
        return None
    target.expect_namespace(rec.mntns, rec.dev)
    return rec


def update_record(target: Target, spec: VmSpec, sdir: str | None = None, *,
                  dev: int | None = None) -> None:
    """Store ``spec`` as what this VM should have (after hotplug)."""
    try:
        old = record.read(target.pid, sdir)
    except SpecError:
        old = None  # a corrupt record is replaced by a good one
    if old is not None and old.starttime != target.starttime:
        old = None
    record.write(record.Record(
        target.pid, target.starttime, replace(spec, source="record"),
        old.submounts if old else (), target.mntns,
        dev if dev is not None else (old.dev if old else None)), sdir)
