"""Unit tests for the service's protocol and configuration parsers (no root needed)."""

from __future__ import annotations

import json

import pytest

from nsmount.faces.service import config, protocol
from nsmount.faces.service.config import ConfigError
from nsmount.faces.service.protocol import ProtocolError, parse_request


def req(**kw: object) -> bytes:
    return json.dumps({"v": 1, **kw}).encode()


def code_of(line: bytes) -> str:
    with pytest.raises(ProtocolError) as ei:
        parse_request(line)
    assert ei.value.message
    return ei.value.code


def test_good_requests() -> None:
    r = parse_request(req(op="list", id=7))
    assert (r.op, r.id, r.timeout) == ("list", 7, protocol.DEFAULT_TIMEOUT)
    r = parse_request(req(op="started", domain="web1", xml="<domain/>", timeout=5))
    assert (r.domain, r.xml, r.timeout) == ("web1", "<domain/>", 5.0)
    r = parse_request(req(op="repair", pid=42))
    assert r.target == "pid:42"
    r = parse_request(req(op="device-add", domain="d", paths=["/dev//loop3", "/dev/./sdb"]))
    assert r.paths == ("/dev/loop3", "/dev/sdb") and r.target == "d"


@pytest.mark.parametrize("line,code", [
    (b"{", "bad-request"),
    (b"[]", "bad-request"),
    (b"\xff", "bad-request"),
    (json.dumps({"op": "list"}).encode(), "unsupported-version"),
    (json.dumps({"v": "1", "op": "list"}).encode(), "unsupported-version"),
    (req(op="nope"), "unknown-op"),
    (req(op=["list"]), "unknown-op"),
    (req(op="list", junk=1), "bad-request"),
    (req(op="list", id=[1]), "bad-request"),
    (req(op="list", id="x" * 129), "bad-request"),
    (req(op="list", timeout=0), "bad-request"),
    (req(op="list", timeout=1e9), "bad-request"),
    (req(op="list", timeout=True), "bad-request"),
    (b'{"v":1,"op":"list","timeout":NaN}', "bad-request"),
    (req(op="list", pid=3), "bad-request"),
    (req(op="started"), "bad-request"),
    (req(op="started", domain=""), "bad-request"),
    (req(op="started", domain="a/b"), "bad-request"),
    (req(op="started", domain=".."), "bad-request"),
    (req(op="started", domain="a\nb"), "bad-request"),
    (req(op="started", domain="x" * 257), "bad-request"),
    (req(op="started", domain="d", pid=3), "bad-request"),
    (req(op="started", domain="d", xml=3), "bad-request"),
    (req(op="repair"), "bad-request"),
    (req(op="repair", pid=1, domain="d"), "bad-request"),
    (req(op="repair", pid=0), "bad-request"),
    (req(op="repair", pid=-5), "bad-request"),
    (req(op="repair", pid=True), "bad-request"),
    (req(op="repair", pid=1 << 40), "bad-request"),
    (req(op="repair", pid=3, paths=["/dev/x"]), "bad-request"),
    (req(op="device-add", pid=3), "bad-request"),
    (req(op="device-add", pid=3, paths=[]), "bad-request"),
    (req(op="device-add", pid=3, paths="/dev/x"), "bad-request"),
    (req(op="device-add", pid=3, paths=["/dev/../etc/shadow"]), "bad-request"),
    (req(op="device-add", pid=3, paths=["/etc/shadow"]), "bad-request"),
    (req(op="device-add", pid=3, paths=["/dev"]), "bad-request"),
    (req(op="device-add", pid=3, paths=["dev/x"]), "bad-request"),
    (req(op="device-add", pid=3, paths=["/dev/x"] * 65), "bad-request"),
    (b"x" * (protocol.MAX_REQUEST + 1), "too-large"),
])
def test_bad_requests(line: bytes, code: str) -> None:
    assert code_of(line) == code


def test_error_keeps_the_id() -> None:
    with pytest.raises(ProtocolError) as ei:
        parse_request(req(op="repair", id="abc"))
    assert ei.value.req_id == "abc"


def test_encode_is_one_ascii_line() -> None:
    line = protocol.encode(protocol.ok(1, {"name": "a\nb\udcff"}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["result"]["name"] == "a\nb\udcff"


def test_config_good() -> None:
    c = config.parse('mounts = ["/mnt//huge"]\ndefault_devices = ["/dev/vhost-net"]\n'
                     'socket_group = "kvm"\ntimeout = 5\njobs = 2\ndebounce_ms = 0\n'
                     'state_dir = "/run/x"\nmetrics_file = "/tmp/m.prom"\n', "/etc/n.conf")
    assert c.mounts == ("/mnt/huge",) and c.default_devices == ("/dev/vhost-net",)
    assert (c.socket_group, c.timeout, c.jobs, c.debounce_ms) == ("kvm", 5.0, 2, 0)
    assert config.parse("", "x").mounts == ()


@pytest.mark.parametrize("text,line,words", [
    ('mounts = ["/a"]\n\nmounts = [1', 3, ["nsmount.conf:3:"]),
    ('timeout = 5\nbogus = 1\n', 2, ["unknown key 'bogus'"]),
    ('timeout = 5\nmounts = "/mnt"\n', 2, ["mounts"]),
    ('mounts = ["/a/../etc"]\n', 1, [".."]),
    ('mounts = ["/"]\n', 1, ["'/'"]),
    ('default_devices = ["/etc/passwd"]\n', 1, ["under /dev"]),
    ('\n\ntimeout = "soon"\n', 3, ["timeout"]),
    ('timeout = 0\n', 1, ["timeout"]),
    ('jobs = -1\n', 1, ["jobs"]),
    ('jobs = true\n', 1, ["jobs"]),
    ('socket_group = "a b"\n', 1, ["group"]),
    ('socket_group = 1.5\n', 1, ["group"]),
    ('state_dir = "relative"\n', 1, ["absolute"]),
    ('x = [\n', 1, ["nsmount.conf:"]),
])
def test_config_errors_name_file_and_line(text: str, line: int, words: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        config.parse(text, "/etc/nsmount/nsmount.conf")
    msg = ei.value.oneline()
    assert "\n" not in msg
    assert msg.startswith(f"/etc/nsmount/nsmount.conf:{line}:"), msg
    for w in words:
        assert w in msg, msg


def test_config_load(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    d = str(tmp_path)
    monkeypatch.delenv("NSMOUNT_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(os.path.join(d, "absent.conf"))
    p = os.path.join(d, "n.conf")
    with open(p, "w") as fh:
        fh.write('mounts = ["/mnt/huge"]\n')
    monkeypatch.setenv("NSMOUNT_CONFIG", p)
    assert config.load().mounts == ("/mnt/huge",)
    os.mkfifo(os.path.join(d, "fifo"))
    with pytest.raises(ConfigError, match="not a regular file"):
        config.load(os.path.join(d, "fifo"))


def test_metrics_render_and_write(tmp_path: object) -> None:
    import os

    from nsmount.faces.service.metrics import Metrics

    m = Metrics(vms=3, repairs=2)
    m.event("mount-attach")
    m.latency(0.03)
    p = os.path.join(str(tmp_path), "n.prom")
    m.write(p)
    with open(p) as fh:
        text = fh.read()
    assert "nsmount_vms_managed 3" in text and 'kind="mount-attach"} 1' in text
    assert 'nsmount_event_to_repaired_seconds_bucket{le="0.05"} 1' in text
    assert 'nsmount_event_to_repaired_seconds_bucket{le="0.025"} 0' in text
    assert os.listdir(str(tmp_path)) == ["n.prom"]


def test_fanotify_event_parser() -> None:
    import struct

    from nsmount.kernel import notify

    info = struct.pack("=BBHIQ", notify.FAN_EVENT_INFO_TYPE_MNT, 0, 16, 0, 2147483650)
    meta = struct.pack("=IBBHQii", 24 + len(info), 3, 0, 24, notify.FAN_MNT_ATTACH, -1, 0)
    evs = list(notify.parse_mount_events(meta + info + b"\x01\x02"))
    assert [(e.kind, e.mnt_id) for e in evs] == [("attach", 2147483650)]


def test_fd_ops() -> None:
    r = parse_request(req(op="open-device", path="/dev//loop3"))
    assert (r.op, r.path, r.write) == ("open-device", "/dev/loop3", True)
    r = parse_request(req(op="device-bind", path="/dev/loop3", write=False, id="x"))
    assert (r.op, r.path, r.write, r.id) == ("device-bind", "/dev/loop3", False, "x")
    assert "open-device" in protocol.FD_OPS and "list" not in protocol.FD_OPS
    assert parse_request(req(op="list")).path is None


@pytest.mark.parametrize("obj", [
    {"op": "open-device"},
    {"op": "open-device", "path": 7},
    {"op": "open-device", "path": "/etc/shadow"},
    {"op": "open-device", "path": "/dev/../etc/shadow"},
    {"op": "open-device", "path": "dev/loop0"},
    {"op": "open-device", "path": "/dev/loop0", "write": "yes"},
    {"op": "open-device", "path": "/dev/loop0", "pid": 5},
    {"op": "device-bind", "path": "/dev/loop0", "paths": ["/dev/loop0"]},
    {"op": "list", "path": "/dev/loop0"},
    {"op": "repair", "pid": 5, "write": False},
])
def test_fd_ops_refused(obj: dict[str, object]) -> None:
    assert code_of(req(**obj)) == "bad-request"
