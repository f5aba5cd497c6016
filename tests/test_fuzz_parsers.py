"""Property tests: every parser of untrusted text returns a model or raises SpecError.

The parsers read files an admin points us at, a libvirt hook's stdin and other
processes' /proc files, so no input may escape as a raw ValueError/KeyError/...
(the CLI maps SpecError to a one-line message and exit code 3/4).

Profiles: ``default`` (200 examples) for every run, ``fuzz`` (10000) for a soak:
``NSMOUNT_HYPOTHESIS_PROFILE=fuzz python3 -m pytest tests/test_fuzz_parsers.py``.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsmount.errors import SpecError
from nsmount.model import mountinfo
from nsmount.state.libvirtspec import HostContext, LoadedConf
from nsmount.state.libvirtspec import spec_from_domain_xml as host_spec_from_domain_xml
from nsmount.model.libvirt_xml import derive_domain_xml, spec_from_domain_xml, spec_from_status_xml
from nsmount.model.qemu_conf import QemuConf, parse_qemu_conf
from nsmount.model.qemu_cmdline import spec_from_cmdline, spec_from_proc_cmdline
from nsmount.model.spec import VmSpec

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", max_examples=200, deadline=None,
                          suppress_health_check=_SLOW)
settings.register_profile("fuzz", max_examples=10000, deadline=None,
                          suppress_health_check=_SLOW)
settings.load_profile(os.environ.get("NSMOUNT_HYPOTHESIS_PROFILE", "default"))


# ------------------------------------------------------------------ shared bits
XML_CHARS = st.characters(exclude_categories=["Cs", "Cc"])  # what XML can carry
PATHS = st.one_of(
    st.sampled_from([
        "/dev/sda", "/dev/loop0", "/dev/vfio/7", "/dev/ttyS1", "/dev/tpm0", "/dev/fdset/3",
        "/dev/hugepages/libvirt/qemu/1-x", "/dev/shm/m", "/dev/../etc/shadow", "dev/sda",
        "", "/", "/dev", "/var/lib/x.qcow2", "/dev//a/./b", "relative", "/dev/\0x",
        "json:{}", "nbd://h/e", "/dev/a,,b",
    ]),
    st.text(min_size=0, max_size=30).map(lambda s: "/dev/" + s),
    st.text(max_size=20),
)
XML_PATHS = st.one_of(
    PATHS.filter(lambda p: all(ch.isprintable() for ch in p)),
    st.text(XML_CHARS, max_size=20).map(lambda s: "/dev/" + s),
)


def _check(fn: Any, *args: Any) -> None:
    """The property: a VmSpec (or (pid, VmSpec)) comes back, or SpecError is raised."""
    try:
        out = fn(*args)
    except SpecError as exc:
        assert "\n" not in str(exc)  # one line for the admin
        return
    spec = out[1] if isinstance(out, tuple) else out
    assert isinstance(spec, VmSpec)
    if isinstance(out, tuple):
        assert isinstance(out[0], int) and out[0] > 0


# ------------------------------------------------------------------ mountinfo
PATH_CHARS = st.characters(codec="utf-8", exclude_characters="\0/")
COMPONENT = st.text(PATH_CHARS, min_size=1, max_size=8)
ABS_PATH = st.lists(COMPONENT, max_size=4).map(lambda parts: "/" + "/".join(parts))
WORD = st.text(st.characters(codec="ascii", categories=["L", "N"], include_characters="_.,="),
               min_size=1, max_size=12)
UINT = st.integers(min_value=0, max_value=2**31)


def _kernel_view(line: str) -> str:
    """What read() hands parse(): the kernel's UTF-8 bytes decoded as latin-1."""
    return line.encode("utf-8").decode("latin-1")


@st.composite
def mount_fields(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "mount_id": draw(UINT), "parent_id": draw(UINT), "major": draw(UINT),
        "minor": draw(UINT), "root": draw(ABS_PATH), "mountpoint": draw(ABS_PATH),
        "options": draw(WORD), "fstype": draw(COMPONENT.filter(lambda s: s != "-")),
        "source": draw(COMPONENT), "superoptions": draw(WORD),
        "shared": draw(st.none() | UINT), "master": draw(st.none() | UINT),
        "propagate_from": draw(st.none() | UINT), "unbindable": draw(st.booleans()),
    }


def _line(f: dict[str, Any]) -> str:
    optional = []
    if f["shared"] is not None:
        optional.append(f"shared:{f['shared']}")
    if f["master"] is not None:
        optional.append(f"master:{f['master']}")
    if f["propagate_from"] is not None:
        optional.append(f"propagate_from:{f['propagate_from']}")
    if f["unbindable"]:
        optional.append("unbindable")
    e = mountinfo.escape
    return " ".join([
        str(f["mount_id"]), str(f["parent_id"]), f"{f['major']}:{f['minor']}",
        e(f["root"]), e(f["mountpoint"]), f["options"], *optional, "-",
        e(f["fstype"]), e(f["source"]), f["superoptions"],
    ])


@given(st.text(st.characters(codec="ascii")))
def test_escape_unescape_round_trip_ascii(path: str) -> None:
    assert mountinfo.unescape(mountinfo.escape(path)) == path
    assert not any(ch in mountinfo.escape(path) for ch in " \t\n")


@given(st.text(st.characters(codec="utf-8")))
def test_escape_unescape_round_trip_through_kernel_bytes(path: str) -> None:
    """Any UTF-8 path survives: escape -> UTF-8 bytes -> latin-1 text -> unescape."""
    assert mountinfo.unescape(_kernel_view(mountinfo.escape(path))) == path


@given(st.lists(mount_fields(), min_size=1, max_size=5))
def test_well_formed_lines_parse_to_their_fields(rows: list[dict[str, Any]]) -> None:
    text = "\n".join(_line(r) for r in rows) + "\n"
    mounts = mountinfo.parse(_kernel_view(text))
    assert [m.__dict__ for m in mounts] == rows


@given(st.text())
def test_mountinfo_arbitrary_text(text: str) -> None:
    try:
        mountinfo.parse(text)
    except mountinfo.MountinfoError:
        pass


@given(st.lists(st.one_of(
    st.sampled_from(["1", "0", "-", "12:3", "shared:1", "master:x", "propagate_from:",
                     "unbindable", "/", "/a\\040b", "\\777", "²", "1:²", "rw", "", "a:b:c",
                     "9" * 5000]),
    st.text(max_size=6)), max_size=14))
def test_mountinfo_plausible_lines(parts: list[str]) -> None:
    try:
        mountinfo.parse(" ".join(parts))
    except mountinfo.MountinfoError:
        pass


# ------------------------------------------------------------------ libvirt XML
TAGS = ["devices", "disk", "source", "backingStore", "hostdev", "tpm", "backend", "device",
        "rng", "serial", "parallel", "console", "channel", "interface", "driver", "model",
        "memoryBacking", "hugepages", "page", "input", "graphics", "gl", "launchSecurity",
        "seclabel", "label", "imagelabel", "memory", "path", "video", "acceleration",
        "name", "uuid", "reservations", "emulator", "domain"]
ATTRS = {
    "type": st.sampled_from(["block", "file", "dev", "pci", "mdev", "nvme", "passthrough",
                             "network", "bridge", "ethernet", "hostdev", "evdev", "dynamic",
                             "static", "sev", "scsi", "user", ""]),
    "model": st.sampled_from(["dac", "random", "egd", "virtio", "nvdimm", "sgx-epc",
                              "selinux", "e1000"]),
    "name": st.sampled_from(["vhost", "qemu", "vfio"]),
    "mode": st.sampled_from(["subsystem", "capabilities"]),
    "managed": st.sampled_from(["yes", "no"]),
    "size": st.one_of(st.sampled_from(["1", "2048", "0", "-1", "1e3", "9" * 30, ""]),
                      st.integers(0, 2**70).map(str)),
    "unit": st.sampled_from(["G", "M", "KiB", "k", "b", "bytes", "GB", "TiB", "E", "Q", ""]),
    "id": st.one_of(st.sampled_from(["-1", "0", "7", "12", "x", "", " 3"]),
                 st.text(XML_CHARS, max_size=4)),
    "dev": XML_PATHS, "file": XML_PATHS, "path": XML_PATHS, "rendernode": XML_PATHS,
    "evdev": XML_PATHS,
}


@st.composite
def _leaf(draw: st.DrawFn) -> ET.Element:
    el = ET.Element(draw(st.sampled_from(TAGS)))
    for key in draw(st.lists(st.sampled_from(sorted(ATTRS)), max_size=3, unique=True)):
        el.set(key, draw(ATTRS[key]))
    if draw(st.booleans()):
        el.text = draw(st.one_of(XML_PATHS, st.sampled_from(["+107:+107", "qemu:qemu", "+1:+x"])))
    return el


def _with_children(parent_and_kids: tuple[ET.Element, list[ET.Element]]) -> ET.Element:
    parent, kids = parent_and_kids
    parent.extend(kids)
    return parent


#: Trees of libvirt-ish elements, bounded by leaf count (cheap to generate).
XML_TREE = st.recursive(
    _leaf(),
    lambda kids: st.tuples(_leaf(), st.lists(kids, max_size=4)).map(_with_children),
    max_leaves=25,
)


def _serialise(el: ET.Element) -> str:
    try:
        return ET.tostring(el, encoding="unicode")
    except (ValueError, TypeError):  # ElementTree refuses some control characters
        return "<domain/>"


def _el(tag: str, attrs: dict[str, str] | None = None, *kids: ET.Element,
        text: str | None = None) -> ET.Element:
    el = ET.Element(tag, attrs or {})
    el.extend(kids)
    el.text = text
    return el


@st.composite
def libvirt_device(draw: st.DrawFn) -> ET.Element:
    """One <devices> child shaped like libvirt's, with drawn types and paths."""
    kind = draw(st.sampled_from(["disk", "hostdev", "tpm", "rng", "chardev", "interface",
                                 "input", "graphics", "memory", "video", "hostdev2", "mirror",
                                 "dimm"]))
    path = draw(XML_PATHS)
    typ = draw(ATTRS["type"])
    if kind == "disk":
        chain = _el("backingStore")
        for _ in range(draw(st.integers(0, 4))):
            src_key = draw(st.sampled_from(["dev", "file"]))
            chain = _el("backingStore", {"type": draw(ATTRS["type"])},
                        _el("source", {src_key: draw(XML_PATHS)}), chain)
        attr = draw(st.sampled_from(["dev", "file"]))
        src = _el("source", {attr: path})
        if draw(st.booleans()):
            src.append(_el("reservations", {"managed": draw(ATTRS["managed"])}))
        return _el("disk", {"type": typ}, src, chain)
    if kind == "hostdev":
        return _el("hostdev", {"mode": draw(ATTRS["mode"]), "type": typ}, _el("source"))
    if kind == "hostdev2":  # addresses as libvirt writes them, and junk
        num = st.one_of(st.sampled_from(["0x0000", "0x06", "017", "9", "0x1f", "x", "",
                                         "0x" + "f" * 12]), st.text(XML_CHARS, max_size=4))
        addr = {k: draw(num) for k in ("domain", "bus", "slot", "function", "device")}
        if draw(st.booleans()):
            addr["uuid"] = draw(st.sampled_from(["c2177883-f1bb-47f0-914d-32a22e3a8804",
                                                 "../../x", ""]))
        kids = [_el("address", addr), _el("adapter", {"name": draw(st.sampled_from(
            ["scsi_host2", "scsi_hostx", "", "scsi_host" + "9" * 30]))}),
            _el("vendor", {"id": draw(num)}), _el("product", {"id": draw(num)})]
        return _el("hostdev", {"mode": "subsystem", "type": draw(st.sampled_from(
            ["pci", "mdev", "usb", "scsi", "scsi_host"]))},
            _el("source", {"protocol": draw(st.sampled_from(["vhost", "iscsi", ""]))},
                *draw(st.lists(st.sampled_from(kids), max_size=4))))
    if kind == "mirror":
        return _el("disk", {}, _el("source", {"file": path}),
                   _el("mirror", {"type": typ, "file": draw(XML_PATHS)},
                       _el("source", {"dev": draw(XML_PATHS), "file": path})))
    if kind == "dimm":
        return _el("memory", {"model": draw(st.sampled_from(["dimm", "virtio-mem"]))},
                   _el("source", {}, _el("pagesize", {"unit": draw(ATTRS["unit"])},
                                         text=draw(ATTRS["size"]))))
    if kind == "tpm":
        return _el("tpm", {}, _el("backend", {"type": typ}, _el("device", {"path": path})))
    if kind == "rng":
        return _el("rng", {}, _el("backend", {"model": draw(ATTRS["model"]), "type": typ},
                                  _el("source", {"path": path}), text=path))
    if kind == "chardev":
        tag = draw(st.sampled_from(["serial", "parallel", "console", "channel"]))
        return _el(tag, {"type": typ}, _el("source", {"path": path}))
    if kind == "interface":
        return _el("interface", {"type": typ}, _el("model", {"type": draw(ATTRS["model"])}),
                   _el("driver", {"name": draw(ATTRS["name"])}))
    if kind == "input":
        return _el("input", {"type": draw(st.sampled_from(["evdev", "passthrough"]))},
                   _el("source", {"dev": path, "evdev": path}))
    if kind == "graphics":
        return _el("graphics", {"type": "spice"}, _el("gl", {"rendernode": path}))
    if kind == "memory":
        return _el("memory", {"model": draw(st.sampled_from(["nvdimm", "virtio-pmem",
                                                               "sgx-epc", "dimm"]))},
                   _el("source", {}, _el("path", text=path)))
    return _el("video", {}, _el("model", {}, _el("acceleration", {"rendernode": path})))


@st.composite
def libvirt_domain(draw: st.DrawFn) -> ET.Element:
    root = _el("domain", {"type": "kvm"}, _el("name", text=draw(st.text(XML_CHARS,
                                                                         max_size=30))))
    if draw(st.booleans()):
        root.set("id", draw(ATTRS["id"]))
    if draw(st.booleans()):
        pages = [_el("page", {"size": draw(ATTRS["size"]), "unit": draw(ATTRS["unit"])})
                 for _ in range(draw(st.integers(0, 3)))]
        root.append(_el("memoryBacking", {}, _el("hugepages", {}, *pages)))
    if draw(st.booleans()):
        label = draw(st.one_of(st.sampled_from(["+107:+107", "qemu:qemu", "+1:+x",
                                                "+99999999999:+1"]),
                               st.text(XML_CHARS, max_size=10)))
        root.append(_el("seclabel", {"type": draw(ATTRS["type"]), "model": "dac"},
                        _el("label", text=label)))
    root.append(_el("devices", {}, *draw(st.lists(libvirt_device(), max_size=8))))
    if draw(st.booleans()):
        root.append(_el("launchSecurity", {"type": draw(st.sampled_from(["sev", "s390-pv"]))}))
    root.extend(draw(st.lists(XML_TREE, max_size=2)))  # and some nonsense
    return root


@st.composite
def domain_xml(draw: st.DrawFn) -> str:
    text = _serialise(draw(libvirt_domain()))
    # sometimes damage it: truncate, or splice in junk
    how = draw(st.sampled_from(["keep", "keep", "keep", "truncate", "splice"]))
    if how == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif how == "splice":
        at = draw(st.integers(0, len(text)))
        junk = draw(st.one_of(st.text(max_size=8), st.sampled_from(
            ["<!DOCTYPE x>", "<!ENTITY a 'b'>", "&a;", "]]>", "<![CDATA[", "\x00", "\ud800"])))
        text = text[:at] + junk + text[at:]
    return text


@given(st.text())
def test_domain_xml_arbitrary_text(text: str) -> None:
    _check(spec_from_domain_xml, text)
    _check(spec_from_status_xml, text)


@given(domain_xml())
def test_domain_xml_plausible(text: str) -> None:
    _check(spec_from_domain_xml, text)


#: a host with nothing: every sysfs lookup misses, qemu.conf absent
_EMPTY_HOST = HostContext("/nonexistent-sysfs", "/nonexistent-dev",
                          LoadedConf("qemu.conf", QemuConf()))


@given(domain_xml())
def test_domain_xml_with_host_and_report(text: str) -> None:
    """The host-aware spec and the ``nsmount spec`` report never crash either."""
    from nsmount.faces.specreport import format_text, report_from_derivation

    _check(lambda t: host_spec_from_domain_xml(t, ctx=_EMPTY_HOST), text)
    try:
        d = derive_domain_xml(text)
    except SpecError:
        return
    rep = report_from_derivation(d, _EMPTY_HOST, source="domain-xml")
    json.dumps(rep)
    assert all("\n" not in line for line in format_text(rep))


QEMU_CONF = st.lists(st.one_of(
    st.sampled_from(['user = "root"', "group = '+107'", "cgroup_device_acl = [", '"/dev/kvm",',
                     "]", "hugetlbfs_mount = \"/dev/hugepages\"", "x = -12", "# c", ";",
                     'a = "unterminated', "= 1", "[", '"', "user = 5"]),
    st.text(max_size=20)), max_size=8).map("\n".join)


@given(QEMU_CONF)
def test_qemu_conf_text(text: str) -> None:
    try:
        conf = parse_qemu_conf(text, "/etc/libvirt/qemu.conf")
    except SpecError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("/etc/libvirt/qemu.conf:")
        return
    assert isinstance(conf, QemuConf)


@given(domain_xml(), st.one_of(st.sampled_from(["1", "0", "-4", "", "x", "9" * 40]),
                               st.integers(-5, 2**40).map(str)), st.integers(0, 2))
def test_status_xml_plausible(domain: str, pid: str, copies: int) -> None:
    body = domain.removeprefix("<?xml version='1.0' encoding='UTF-8'?>") * copies
    _check(spec_from_status_xml,
           f"<domstatus state='running' pid='{pid}'><taint flag='x'/>{body}</domstatus>")


# ------------------------------------------------------------------ QEMU cmdline
OPTIONS = ["-drive", "-blockdev", "-object", "-device", "-chardev", "-netdev", "-nic",
           "-tpmdev", "-serial", "-parallel", "-display", "-spice", "-name", "-mem-path",
           "-uuid", "-enable-kvm", "-S", "-m", "-append", "--drive", "-", "--"]
KEYS = ["file", "filename", "driver", "qom-type", "mem-path", "path", "type", "vhost",
        "vhostfd", "hugetlb", "hugetlbsize", "evdev", "rendernode", "sev-device", "guest",
        "file.filename", "id", "backend"]
KIND_VALUES = ["host_device", "memory-backend-file", "memory-backend-memfd", "rng-random",
               "input-linux", "sev-guest", "memory-backend-epc", "vfio-pci", "tty", "serial",
               "tap", "passthrough", "on", "off", "2M", "1G", "x"]
VALUE = st.one_of(PATHS, st.sampled_from(KIND_VALUES),
                  st.builds(lambda s: "json:" + s, st.text(max_size=20)))

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | VALUE,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), kids, max_size=4),
    max_leaves=12,
)


@st.composite
def option_value(draw: st.DrawFn) -> str:
    form = draw(st.sampled_from(["keyval", "json", "junk"]))
    if form == "keyval":
        pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), VALUE), max_size=5))
        head = draw(st.sampled_from(KIND_VALUES + [""]))
        body = ",".join(f"{k}={v.replace(',', draw(st.sampled_from([',,', ','])))}"
                        for k, v in pairs)
        return ",".join(x for x in (head, body) if x)
    if form == "json":
        obj = draw(st.dictionaries(st.sampled_from(KEYS), JSON, max_size=5))
        text = json.dumps(obj)
        if draw(st.booleans()):
            text = text[: draw(st.integers(0, len(text)))]
        return text
    return draw(st.text(max_size=20))


ARGV = st.lists(st.one_of(st.sampled_from(OPTIONS), option_value(), st.text(max_size=10)),
                max_size=16).map(lambda rest: ["qemu-system-x86_64"] + rest)


@given(st.lists(st.text(max_size=30), max_size=10))
def test_cmdline_arbitrary_words(argv: list[str]) -> None:
    _check(spec_from_cmdline, argv)


@given(ARGV)
def test_cmdline_plausible(argv: list[str]) -> None:
    _check(spec_from_cmdline, argv)


@given(st.binary(max_size=200))
def test_proc_cmdline_arbitrary_bytes(raw: bytes) -> None:
    _check(spec_from_proc_cmdline, raw)


@given(ARGV)
def test_proc_cmdline_plausible(argv: list[str]) -> None:
    raw = b"\0".join(a.encode("utf-8", "surrogatepass") for a in argv) + b"\0"
    _check(spec_from_proc_cmdline, raw)
    if "\0" not in "".join(argv):
        try:
            expected: VmSpec | None = spec_from_cmdline(argv)
        except SpecError:
            expected = None
        try:
            got: VmSpec | None = spec_from_proc_cmdline(raw)
        except SpecError:
            got = None
        if expected is not None and got is not None:
            assert got == expected


def _parsed_or_error(fn: Any, line: str) -> object:
    try:
        return fn(line)
    except mountinfo.MountinfoError:
        return "error"


@given(st.one_of(
    mount_fields().map(_line),
    st.lists(st.sampled_from(["1", "0", "-", "12:3", "shared:1", "master:x", "master:12",
                              "propagate_from:", "propagate_from:4", "unbindable", "/",
                              "/a\\040b", "²", "1:²", "rw", "", "a:b:c", "9" * 21,
                              "x:1", "shared:007"]), max_size=14).map(" ".join),
    st.text(st.characters(codec="ascii"), max_size=40)))
def test_mountinfo_fast_path_is_the_checked_parser(line: str) -> None:
    """parse_line's fast path accepts and returns exactly what the field-by-field
    parser does (which still handles every line the fast path hands over)."""
    fast = _parsed_or_error(mountinfo._parse_line, line)
    checked = _parsed_or_error(mountinfo._parse_line_checked, line)
    assert fast == checked
    if isinstance(fast, mountinfo.Mount):
        assert fast.__dict__ == checked.__dict__  # type: ignore[union-attr]


@given(st.one_of(
    mount_fields().map(_line),
    st.lists(st.sampled_from(["1", "0", "-", "12:3", "shared:1", "master:x", "rw", "/",
                              "", "9" * 21, "²", "x"]), max_size=10).map(" ".join)),
    st.sampled_from(["7", "0", "12345", "9" * 20, "9" * 21, "²", "", "x", "-1", "1 2"]),
    st.sampled_from(["3", "0", "9" * 21, "³", "", "a"]))
def test_mountinfo_memo_is_the_checked_parser(line: str, mid: str, parent: str) -> None:
    """A line parsed once, then the same line with other ids (what the memo answers):
    exactly what the field-by-field parser returns or refuses, ids included."""
    mountinfo._MEMO.clear()
    _parsed_or_error(mountinfo.parse_line, line)
    tail = line.partition(" ")[2].partition(" ")[2]
    other = f"{mid} {parent} {tail}"
    got = _parsed_or_error(mountinfo.parse_line, other)
    checked = _parsed_or_error(mountinfo._parse_line_checked, other)
    assert got == checked
    if isinstance(got, mountinfo.Mount):
        assert got.__dict__ == checked.__dict__  # type: ignore[union-attr]


@given(st.one_of(ABS_PATH, st.text(st.sampled_from("ab/"), max_size=8)),
       st.sets(st.one_of(ABS_PATH, st.text(st.sampled_from("ab/"), max_size=8)), max_size=4))
def test_covered_by_walks_every_ancestor(path: str, later: set[str]) -> None:
    """The cached ancestor sets answer what walking up ``path`` one '/' at a time does."""
    cur, hit = path, path in later
    while not hit and cur not in ("", "/"):
        cur = cur.rpartition("/")[0] or "/"
        hit = cur in later
    assert mountinfo._covered_by(path, later) == hit
