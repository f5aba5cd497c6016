"""Rootless launch planning (issue 12), without root: the pure planner's rootless
variant, the face's filters (access to host nodes, writable hugetlbfs), the user's state
dir, the record's user namespace, and that the rootless path needs nothing outside the
standard library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsmount.engine.actions import (STEPS, BindNode, CreateDevTmpfs, MakeDir, MakeHugepageDir,
                                    MakeSymlink, MountDevpts, PreserveMount, SealNamespace,
                                    StackDev, SwitchDev)
from nsmount.engine.hostfacts import Resolved
from nsmount.engine.plan import Desired, plan_launch
from nsmount.errors import PrivilegeError
from nsmount.faces import rootless
from nsmount.model.devnode import Entry
from nsmount.model.spec import DeviceRequest, VmSpec
from nsmount.state import record

REPO = Path(__file__).resolve().parent.parent


def chr_(path: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    return Entry(path, "chr", major, minor, mode)


ENTRIES = (
    chr_("/dev/null", 1, 3), chr_("/dev/ptmx", 5, 2),
    Entry("/dev/disk/by-id/x", "lnk", target="../../loop1"),
    Entry("/dev/loop1", "blk", 7, 1, 0o660, 0, 6),
    chr_("/dev/net/tun", 10, 200),
    chr_("/dev/shm/odd", 1, 3),  # inside a preserved submount: the host's content
)
SUBS = ("/dev/pts", "/dev/shm", "/dev/hugepages")


def _desired(**kw: object) -> Desired:
    base: dict[str, object] = {"entries": ENTRIES, "mounts": (), "uid": 1000, "gid": 1000,
                               "hugepage_dirs": (("/dev/hugepages",
                                                  "/dev/hugepages/libvirt/qemu/4-a"),)}
    base.update(kw)
    return Desired(**base)  # type: ignore[arg-type]


def test_rootless_plan_shape_and_order() -> None:
    acts = plan_launch(_desired(), SUBS, rootless=True)
    kinds = [type(a) for a in acts]
    assert kinds[0] is CreateDevTmpfs and kinds[-1] is SealNamespace
    assert SwitchDev not in kinds  # the host's /dev cannot be unmounted in a user ns
    stack = kinds.index(StackDev)
    # populated before the tmpfs is attached: dirs and symlinks; after: binds
    assert all(kinds.index(k) < stack for k in (MakeDir, MakeSymlink, PreserveMount))
    binds = [a for a in acts if isinstance(a, BindNode)]
    assert [b.entry.path for b in binds] == ["/dev/null", "/dev/loop1", "/dev/net/tun"]
    assert all(acts.index(b) > stack for b in binds)
    assert acts.index(next(a for a in acts if isinstance(a, MountDevpts))) > stack
    # /dev/pts is a new devpts instance, never a clone of the host's; ptmx points there
    assert [a.path for a in acts if isinstance(a, PreserveMount)] == ["/dev/shm",
                                                                       "/dev/hugepages"]
    st = next(a for a in acts if isinstance(a, StackDev))
    assert st.preserved == ("/dev/shm", "/dev/hugepages")
    links = {a.path: a.target for a in acts if isinstance(a, MakeSymlink)}
    assert links == {"/dev/ptmx": "pts/ptmx", "/dev/disk/by-id/x": "../../loop1"}
    # every directory is the caller's (chown to root is impossible in a user namespace)
    dirs = [a for a in acts if isinstance(a, MakeDir)]
    assert {d.path for d in dirs} >= {"/dev/disk", "/dev/disk/by-id", "/dev/net",
                                      "/dev/pts", "/dev/shm", "/dev/hugepages"}
    assert {(d.uid, d.gid) for d in dirs} == {(1000, 1000)}
    assert len({d.path for d in dirs}) == len(dirs)
    hp = [a for a in acts if isinstance(a, MakeHugepageDir)]
    assert [(h.path, h.uid, h.gid) for h in hp] == [
        ("/dev/hugepages/libvirt/qemu/4-a", 1000, 1000)]
    seal = acts[-1]
    assert isinstance(seal, SealNamespace) and (seal.uid, seal.gid) == (1000, 1000)
    # nothing inside a preserved submount
    assert not any("/dev/shm/odd" in a.describe() for a in acts)


def test_root_plan_is_unchanged_by_the_rootless_variant() -> None:
    d = _desired(uid=0, gid=0)
    assert plan_launch(d, SUBS) == plan_launch(d, SUBS, rootless=False)
    kinds = {type(a) for a in plan_launch(d, SUBS)}
    assert not kinds & {StackDev, MountDevpts, BindNode, SealNamespace}


def test_new_actions_are_crash_points_and_serialise() -> None:
    for cls in (StackDev, MountDevpts, BindNode, SealNamespace):
        assert cls in STEPS
    acts = plan_launch(_desired(), SUBS, rootless=True)
    names = {a.to_dict()["action"] for a in acts}
    assert {"stack-dev", "mount-devpts", "bind-node", "seal-namespace"} <= names
    json.dumps([a.to_dict() for a in acts])
    schema = json.loads((REPO / "docs" / "nsmount-output.schema.json").read_text())
    assert names <= set(json.dumps(schema).split('"'))


# ------------------------------------------------------------------ face filters
def _resolved(path: str, node: Entry, required: bool = False) -> Resolved:
    return Resolved(DeviceRequest(path, required=required), (node,))


def test_filter_accessible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = tmp_path / "ok"
    ok.write_text("")
    monkeypatch.setattr(rootless, "accessible",
                        lambda e: "" if e.path.endswith("ok") else "no read-write access")
    good = _resolved(str(ok), chr_(str(ok), 1, 3))
    bad = _resolved("/dev/kvm", chr_("/dev/kvm", 10, 232, 0o600))
    ptmx = _resolved("/dev/ptmx", chr_("/dev/ptmx", 5, 2, 0o000))
    kept, skipped = rootless.filter_accessible([good, bad, ptmx])
    assert kept == [good, ptmx]  # ptmx becomes the new devpts instance's
    assert [(s.request.path, s.reason) for s in skipped] == [("/dev/kvm",
                                                              "no read-write access")]
    with pytest.raises(PrivilegeError, match="required device /dev/kvm"):
        rootless.filter_accessible([_resolved("/dev/kvm", bad.node, required=True)])


def test_accessible_reports_mode_and_owner(tmp_path: Path) -> None:
    f = tmp_path / "n"
    f.write_text("")
    os.chmod(f, 0o666)
    assert rootless.accessible(Entry(str(f), "chr", 1, 3, 0o666)) == ""
    why = rootless.accessible(Entry(str(tmp_path / "missing"), "blk", 7, 0, 0o600, 0, 6))
    assert "blk 0600 0:6" in why and f"uid {os.getuid()}" in why


def test_hugepage_dir_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mnt = tmp_path / "hp"
    mnt.mkdir()
    path = f"{mnt}/libvirt/qemu/4-a"
    uid = os.getuid()
    assert rootless.hugepage_dir_writable(str(mnt), path, uid) == ""
    (mnt / "libvirt").mkdir()
    (mnt / "libvirt" / "qemu").write_text("")
    assert "not a directory" in rootless.hugepage_dir_writable(str(mnt), path, uid)
    (mnt / "libvirt" / "qemu").unlink()
    os.makedirs(path)
    assert rootless.hugepage_dir_writable(str(mnt), path, uid) == ""
    assert "belongs to uid" in rootless.hugepage_dir_writable(str(mnt), path, uid + 1)
    os.rmdir(path)
    monkeypatch.setattr(rootless.os, "access", lambda *a, **k: False)
    assert "may not create directories in" in rootless.hugepage_dir_writable(str(mnt), path,
                                                                            uid)


# ------------------------------------------------------------------ state dir, record
def test_state_dir_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NSMOUNT_STATE_DIR", raising=False)
    monkeypatch.setattr(record.os, "geteuid", lambda: 0)
    assert record.state_dir() == "/run/nsmount"  # root: exactly as before
    monkeypatch.setattr(record.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(record.os, "getuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert record.state_dir() == "/run/user/1000/nsmount"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/nonsense")
    assert record.state_dir() == "/run/user/1000/nsmount"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert record.state_dir() == "/run/user/1000/nsmount"
    monkeypatch.setenv("NSMOUNT_STATE_DIR", "/x")
    assert record.state_dir() == "/x" and record.state_dir("/y") == "/y"


def test_record_keeps_the_user_namespace() -> None:
    rec = record.Record(5, 7, VmSpec(name="a"), (), (1, 2), 3, (4, 5))
    back = record.Record.from_json(rec.to_json())
    assert back.userns == (4, 5) and back.mntns == (1, 2)
    old = json.loads(rec.to_json())
    del old["userns"]
    assert record.Record.from_json(json.dumps(old)).userns is None


# ------------------------------------------------------------------ standard library only
BLOCK = r'''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("defusedxml", "psutil", "pyroute2", "shtab"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
'''


def test_rootless_path_imports_only_the_standard_library(tmp_path: Path) -> None:
    """The rootless launcher runs with the system python3 (no virtualenv): planning,
    the CLI's exec --dry-run and the fd passing need no third-party module."""
    spec = tmp_path / "vm.toml"
    spec.write_text('name = "a"\ndevices = [{path = "/dev/loop0", optional = true}]\n')
    code = BLOCK + f'''
from nsmount.faces import launcher, rootless, fdpass
from nsmount.kernel import userns
from nsmount.model.spec import VmSpec
lp = launcher.prepare(VmSpec(name="a"), rootless=True)
assert lp.rootless and lp.actions, lp
from nsmount.cli.main import main
rc = main(["exec", "--dry-run", "--json", "--spec", {str(spec)!r}, "--", "true"])
assert rc == 0, rc
rc = main(["exec", "--dry-run", "--domain-xml", "/dev/null", "--", "true"])
assert rc == 2, rc  # XML needs defusedxml: a clear one-line error, not a traceback
'''
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "needs defusedxml" in r.stderr
    doc = json.loads(r.stdout[:r.stdout.rindex("}") + 1])
    assert doc["rootless"] is (os.geteuid() != 0) and doc["actions"]
