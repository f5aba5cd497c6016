"""``nsmount spec``: pure report of what nsmount derives, text and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsmount.cli.main import main

DOMAIN = """<domain type='kvm' id='7'>
  <name>db&#10;evil&#x9b;31m</name>
  <memoryBacking><hugepages><page size='2' unit='M'/></hugepages></memoryBacking>
  <devices>
    <disk type='block'><source dev='/dev/loop5'/><target dev='vda'/></disk>
    <disk type='file'><source file='/var/../dev/sdq'/><target dev='vdb'/></disk>
    <hostdev mode='subsystem' type='pci'><source>
      <address domain='0x0000' bus='0x06' slot='0x12' function='0x5'/></source></hostdev>
    <memory model='dimm'><source><pagesize unit='G'>1</pagesize></source>
      <target><size unit='G'>1</size><node>0</node></target></memory>
    <serial type='dev'><source path='/dev/tty&#10;S0'/></serial>
  </devices>
  <description><![CDATA[<!DOCTYPE not-a-doctype>]]></description>
</domain>"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    c = tmp_path / "qemu.conf"
    c.write_text('user = "+107"\ngroup = "+108"\ncgroup_device_acl = ["/dev/null", "/dev/kvm"]\n')
    return c


def test_spec_json(tmp_path: Path, conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "d.xml"
    f.write_text(DOMAIN)
    rc, out, _ = run(capsys, "spec", "--domain-xml", str(f), "--json",
                     "--libvirt-config", str(conf))
    assert rc == 0
    rep = json.loads(out)
    paths = {d["path"]: d for d in rep["devices"]}
    assert list(paths)[:2] == ["/dev/null", "/dev/kvm"]  # qemu.conf's default list
    assert paths["/dev/loop5"]["required"] is True
    assert paths["/dev/loop5"]["origin"].startswith("<disk> vda")
    assert "/dev/sdq" not in paths and any("/var/../dev/sdq" in r for r in rep["refused"])
    assert rep["hugepages"] == [2048, 1048576]
    assert rep["owner"] == {"uid": 107, "gid": 108, "from": "qemu.conf"}
    assert rep["vfio_groups"] == [{"origin": "<hostdev> type='pci'", "kind": "pci",
                                   "address": "0000:06:12.5", "group": None}]
    assert rep["name"] == "db\nevil\x9b31m" and rep["id"] == 7


def test_spec_text_escapes_xml_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    f = tmp_path / "d.xml"
    f.write_text(DOMAIN)
    rc, out, _ = run(capsys, "spec", "--domain-xml", str(f),
                     "--libvirt-config", str(tmp_path / "absent.conf"))
    assert rc == 0
    assert "\x9b" not in out
    lines = out.splitlines()
    assert lines[0].startswith("domain db\\012evil\\23331m, id 7")
    assert any(line.startswith("  /dev/tty\\012S0 ") for line in lines)
    assert any("0000:06:12.5 -> absent here" in line for line in lines)
    assert "hugepages: 2048 KiB, 1048576 KiB" in lines
    assert any(line.startswith("refused: ") for line in lines)


def test_spec_from_toml_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('name = "w"\ndevices = ["/dev/loop0", {path = "/dev/sdb", optional = true}]\n'
                 'hugepages = [2048]\nuid = 5\ngid = 6\n')
    rc, out, _ = run(capsys, "spec", "--spec", str(f), "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["hugepages"] == [2048]
    assert {"path": "/dev/sdb", "required": False, "origin": "spec file"} in rep["devices"]
    assert rep["owner"]["uid"] == 5


@pytest.mark.parametrize("text", [
    "<domain><name>x</domain>", "<!DOCTYPE d><domain/>", "\ud800".encode(
        "utf-8", "surrogatepass").decode("latin-1"), "<vm/>",
    "<domain><memoryBacking><hugepages><page size='0'/></hugepages></memoryBacking></domain>",
])
def test_spec_malformed_exit_3_one_line(tmp_path: Path, text: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "d.xml"
    f.write_text(text)
    rc, out, err = run(capsys, "spec", "--domain-xml", str(f), "--json")
    assert rc == 3 and out == ""
    assert err.count("\n") == 1 and err.startswith("nsmount: error: ")


def test_spec_binary_file_and_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    f = tmp_path / "d.xml"
    f.write_bytes(b"<domain>\xff</domain>")
    assert run(capsys, "spec", "--domain-xml", str(f))[0] == 3
    rc, _, err = run(capsys, "spec")
    assert rc == 2 and "exactly one" in err
    rc, _, err = run(capsys, "spec", "--domain-xml", str(tmp_path))
    assert rc == 3 and "not a regular file" in err


def test_spec_target_from_libvirt_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    import os

    pid = os.getpid()
    (tmp_path / "web.pid").write_text(f"{pid}\n")
    (tmp_path / "web.xml").write_text(f"<domstatus state='running' pid='{pid}'>"
                                      f"{DOMAIN}</domstatus>")
    rc, out, _ = run(capsys, "--state-dir", str(tmp_path / "nsm"), "spec", "web",
                     "--libvirt-state-dir", str(tmp_path), "--json")
    assert rc == 0 and json.loads(out)["source"] == "libvirt-status"
