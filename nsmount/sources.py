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

from .errors import NoRecordError, NoSuchProcessError, SpecError, TargetError
from .model import record
from .model.spec import VmSpec
from .target import Target

DEFAULT_LIBVIRT_STATE_DIR = "/run/libvirt/qemu"


def libvirt_state_dir(override: str | None = None) -> str:
    return (override or os.environ.get("NSMOUNT_LIBVIRT_STATE_DIR")
            or DEFAULT_LIBVIRT_STATE_DIR)


def read_pidfile(path: str) -> int:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        raise TargetError(f"no libvirt state file {path}",
                          hint="is the domain running? check --libvirt-state-dir") from None
    if not text.isdigit():
        raise SpecError(f"{path}: not a pid: {text[:40]!r}")
    return int(text)


def libvirt_status(name: str, lvdir: str | None = None) -> tuple[int, VmSpec] | None:
    path = os.path.join(libvirt_state_dir(lvdir), f"{name}.xml")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
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
    if explicit is not None:
        return explicit
    rec = record.read(target.pid, sdir)
    if rec is not None and rec.starttime == target.starttime:
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
        from .model.qemu_cmdline import spec_from_proc_cmdline

        spec = spec_from_proc_cmdline(raw)
        return replace(spec, source="cmdline")
    raise NoRecordError(f"pid {target.pid} is not a QEMU process and nsmount has no record "
                        "of it")


def update_record(target: Target, spec: VmSpec, sdir: str | None = None) -> None:
    """Store ``spec`` as what this VM should have (after hotplug)."""
    old = record.read(target.pid, sdir)
    subs = old.submounts if old is not None and old.starttime == target.starttime else ()
    record.write(record.Record(target.pid, target.starttime,
                               replace(spec, source="record"), subs), sdir)
