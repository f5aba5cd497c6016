"""VmSpec from a QEMU command line (``/proc/PID/cmdline``).

The last-resort source: when neither nsmount's record nor libvirt's status XML
knows a VM, its command line still names the host nodes QEMU opens.  We read the
options that carry host paths (drives, blockdevs, memory backends, vfio, chardevs,
RNG, TPM, tap/vhost, evdev, render nodes, SEV) in both of QEMU's syntaxes:

* QemuOpts/keyval: ``key=value,key2=value2`` where ``,,`` is a literal comma and
  a leading part without '=' is the option's implied key (``-chardev tty,...``);
* JSON: ``-blockdev '{"driver":"host_device","filename":"/dev/sdb"}'`` (libvirt
  uses this form for -blockdev, -object, -device and -netdev).

Only absolute paths under /dev become device requests; ``/dev/fdset/N`` is QEMU's
name for an fd passed with ``-add-fd`` and is skipped.  Absolute paths are
normalised; relative or protocol values (``nbd:``, ``disk.qcow2``) and '..' outside
/dev are legitimate QEMU and simply not ours; a path that reaches /dev through '..'
is refused for that one option (``VmSpec.refused``), not for the whole command line.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any

from ..errors import SpecError
from .paths import canonical, dev_path_of, is_within
from .spec import DeviceRequest, VmSpec

#: Options that take no argument; every other option consumes the next word, as
#: QEMU's option table says (HAS_ARG).  An unknown flag would swallow one word.
NO_ARG_OPTIONS = frozenset({
    "S", "s", "h", "help", "version", "snapshot", "mem-prealloc", "nographic", "curses",
    "sdl", "portrait", "full-screen", "no-frame", "alt-grab", "ctrl-grab", "no-quit",
    "show-cursor", "no-fd-bootchk", "no-hpet", "no-acpi", "no-reboot", "no-shutdown",
    "daemonize", "enable-kvm", "no-kvm", "no-kvm-irqchip", "no-kvm-pit",
    "no-kvm-pit-reinjection", "xen-attach", "xen-domid-restrict", "no-user-config",
    "nodefaults", "nodefconfig", "enable-fips", "old-param", "only-migratable",
    "preconfig", "semihosting", "win2k-hack", "rtc-td-hack", "usb", "singlestep",
    "enable-sync-profile", "perfmap", "jitdump", "async-teardown", "localtime",
    "std-vga", "no-kqemu", "kernel-kqemu",
})
_VFIO = "/dev/vfio/vfio"
_VFIO_DRIVERS = {"vfio-pci", "vfio-pci-nohotplug", "vfio-platform", "vfio-ccw", "vfio-ap"}
_TRUE = {"on", "yes", "true", "y"}
#: libvirt's file-backed (not hugepage) memory directory, qemu.conf memory_backing_dir
_NOT_HUGE = ("/dev/shm", "/var/lib/libvirt/qemu/ram")


class _Acc:
    """Collects what the options say, in order, de-duplicated."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.uuid: str | None = None
        self.devices: dict[str, DeviceRequest] = {}
        self.hugepages: list[int] = []
        self.memory_paths: list[str] = []
        self.refused: list[str] = []

    def dev(self, value: Any, required: bool = True) -> None:
        path, why = dev_path_of(value, what="path in QEMU command line")
        if why is not None and why not in self.refused:
            self.refused.append(why)
        if path is None:
            return
        if is_within(path, "/dev/fdset"):
            return
        old = self.devices.get(path)
        if old is None or (required and not old.required):
            self.devices[path] = DeviceRequest(path, required)

    def huge(self, kib: int) -> None:
        if kib not in self.hugepages:
            self.hugepages.append(kib)

    def mem_path(self, value: Any) -> None:
        path = _abs_path(value)
        if path is None:
            return
        if path not in self.memory_paths:
            self.memory_paths.append(path)
        if not any(is_within(path, d) for d in _NOT_HUGE):
            self.huge(0)


def _abs_path(value: Any) -> str | None:
    """Normalised form of an absolute path value ('..' resolved lexically: a memory
    path is no /dev node); None for anything else (relative, NUL)."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        return None
    return canonical(posixpath.normpath(value), what="path in QEMU command line")


# ----------------------------------------------------------------- option syntax
def split_opts(text: str) -> list[tuple[str | None, str]]:
    """Split QEMU option syntax into (key, value) pairs; key None = implied value.

    ``,,`` is a literal comma.  A part without '=' is the implied value when it
    comes first, else a bare flag (returned as (part, "on")).
    """
    parts: list[str] = []
    cur: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == ",":
            if i + 1 < n and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    out: list[tuple[str | None, str]] = []
    for idx, part in enumerate(parts):
        if part == "":
            continue
        key, eq, val = part.partition("=")
        if eq:
            out.append((key, val))
        elif idx == 0:
            out.append((None, part))
        else:
            out.append((part, "on"))
    return out


def _parse_value(value: str, implied: str, json_ok: bool = False) -> dict[str, Any]:
    """An option argument as a dict, from key=value syntax or (``json_ok``) JSON.

    Only the options QEMU accepts JSON for are read as JSON; elsewhere a '{' is
    just the first character of a value.
    """
    if json_ok and value.lstrip().startswith("{"):
        return _json_object(value)
    opts: dict[str, Any] = {}
    for key, val in split_opts(value):
        opts.setdefault(implied if key is None else key, val)
    return opts


def _json_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"malformed JSON option {text[:60]!r}: {msg}") from None
    if not isinstance(data, dict):
        raise SpecError(f"JSON option is not an object: {text[:60]!r}")
    return data


def _walk_key(data: Any, wanted: str) -> Iterator[Any]:
    """Values of every ``wanted`` key at any depth, also dotted (``file.filename``).

    Iterative, so nested JSON cannot exhaust the stack.
    """
    stack = [data]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for k, v in cur.items():
                if isinstance(k, str) and (k == wanted or k.endswith("." + wanted)):
                    yield v
                if isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(cur, list):
            stack.extend(cur)


def _kind(opts: dict[str, Any], key: str) -> str | None:
    """A type/driver selector, only when it is a string (JSON may give a list: unhashable)."""
    value = opts.get(key)
    return value if isinstance(value, str) else None


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in _TRUE)


# -------------------------------------------------------------------- handlers
def _drive(acc: _Acc, value: str) -> None:
    opts = _parse_value(value, "file")
    for f in _walk_key(opts, "file"):
        if isinstance(f, str) and f.startswith("json:"):
            for fn in _walk_key(_json_object(f[5:]), "filename"):
                acc.dev(fn)
        else:
            acc.dev(f)
    for fn in _walk_key(opts, "filename"):
        acc.dev(fn)


def _blockdev(acc: _Acc, value: str) -> None:
    for fn in _walk_key(_parse_value(value, "driver", True), "filename"):
        acc.dev(fn)


def _object(acc: _Acc, value: str) -> None:
    opts = _parse_value(value, "qom-type", True)
    kind = _kind(opts, "qom-type")
    if kind == "memory-backend-file":
        acc.mem_path(opts.get("mem-path"))
    elif kind == "memory-backend-memfd" and _truthy(opts.get("hugetlb")):
        acc.huge(_bytes_to_kib(opts.get("hugetlbsize", 0)))
    elif kind == "memory-backend-epc":
        acc.dev("/dev/sgx_vepc")
    elif kind == "rng-random":
        acc.dev(opts.get("filename", "/dev/urandom"))
    elif kind == "input-linux":
        acc.dev(opts.get("evdev"))
    elif kind in ("sev-guest", "sev-snp-guest"):
        acc.dev(opts.get("sev-device", "/dev/sev"))


def _bytes_to_kib(value: Any) -> int:
    """QEMU size (bytes, or with k/M/G/T suffix) -> KiB; 0 = default page size."""
    if isinstance(value, bool):
        raise SpecError(f"bad size {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().lower()
        mult = 1
        if text and text[-1] in "kmgt":
            mult = 1024 ** ("kmgt".index(text[-1]) + 1)
            text = text[:-1]
        if not (text.isascii() and text.isdigit() and len(text) <= 20):
            raise SpecError(f"bad size {str(value)[:40]!r}")
        number = int(text) * mult
    if number < 0 or number > 1 << 64:
        raise SpecError(f"bad size {value!r}")
    return number // 1024


def _device(acc: _Acc, value: str) -> None:
    opts = _parse_value(value, "driver", True)
    if _kind(opts, "driver") in _VFIO_DRIVERS:
        acc.dev(_VFIO)


def _chardev(acc: _Acc, value: str) -> None:
    opts = _parse_value(value, "backend")
    if _kind(opts, "backend") in ("tty", "serial", "parallel", "parport"):
        acc.dev(opts.get("path"))


def _netdev(acc: _Acc, value: str) -> None:
    opts = _parse_value(value, "type", True)
    if _kind(opts, "type") == "tap":
        acc.dev("/dev/net/tun", required=False)
        if _truthy(opts.get("vhost")) or opts.get("vhostfd") or opts.get("vhostfds"):
            acc.dev("/dev/vhost-net", required=False)


def _tpmdev(acc: _Acc, value: str) -> None:
    opts = _parse_value(value, "type")
    if _kind(opts, "type") == "passthrough":
        acc.dev(opts.get("path", "/dev/tpm0"))


def _legacy_chardev(acc: _Acc, value: str) -> None:
    """``-serial /dev/ttyS0`` / ``-parallel /dev/parport0``: a bare host device path."""
    acc.dev(value)


def _rendernode(acc: _Acc, value: str) -> None:
    acc.dev(_parse_value(value, "type").get("rendernode"))


def _name(acc: _Acc, value: str) -> None:
    guest = _parse_value(value, "guest").get("guest")
    if isinstance(guest, str) and guest:
        acc.name = guest


def _mem_path(acc: _Acc, value: str) -> None:
    acc.mem_path(value)


def _uuid(acc: _Acc, value: str) -> None:
    acc.uuid = value.strip() or None


_HANDLERS = {
    "drive": _drive, "blockdev": _blockdev, "object": _object, "device": _device,
    "chardev": _chardev, "netdev": _netdev, "nic": _netdev, "net": _netdev,
    "tpmdev": _tpmdev, "serial": _legacy_chardev, "parallel": _legacy_chardev,
    "display": _rendernode, "spice": _rendernode, "name": _name, "mem-path": _mem_path,
    "uuid": _uuid,
}


# ------------------------------------------------------------------- public API
def spec_from_cmdline(argv: list[str], *, source: str = "cmdline") -> VmSpec:
    """Parse a QEMU argv (``argv[0]`` included or not; words not options are skipped).

    ``domain_id`` stays None: libvirt's ``-name guest=<name>`` does not carry the id.
    """
    if not isinstance(argv, (list, tuple)) or not all(isinstance(a, str) for a in argv):
        raise SpecError("command line must be a list of strings")
    if not argv:
        raise SpecError("empty command line")
    acc = _Acc()
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if not word.startswith("-") or word in ("-", "--"):
            continue
        opt = word[2:] if word.startswith("--") else word[1:]
        if opt in NO_ARG_OPTIONS:
            continue
        handler = _HANDLERS.get(opt)
        if i >= len(argv):
            if handler is None:  # maybe a flag missing from NO_ARG_OPTIONS: harmless
                break
            raise SpecError(f"option {word[:40]!r} requires an argument")
        value = argv[i]
        i += 1
        if handler is not None:
            handler(acc, value)
    return VmSpec(name=acc.name, uuid=acc.uuid, devices=tuple(acc.devices.values()),
                  hugepages=tuple(acc.hugepages), memory_paths=tuple(acc.memory_paths),
                  source=source, refused=tuple(acc.refused))


def spec_from_proc_cmdline(raw: bytes) -> VmSpec:
    """Parse raw ``/proc/PID/cmdline`` bytes: NUL-separated, NUL-terminated, UTF-8."""
    if not isinstance(raw, (bytes, bytearray)):
        raise SpecError("cmdline must be bytes")
    if not raw:
        raise SpecError("empty /proc cmdline (exited process or kernel thread)")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"/proc cmdline is not UTF-8 (byte {exc.start})") from None
    argv = text.split("\0")
    if argv[-1] == "":
        argv.pop()
    return spec_from_cmdline(argv)
