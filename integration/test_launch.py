"""Face 1 end to end: ``nsmount exec`` builds a QEMU mount namespace with a minimal /dev.

Every test runs in its own sandbox (tests/sandbox.py: a private mount + PID namespace
playing a hypervisor host with a tmpfs /dev of real nodes, ``/`` rshared).  The checks
run inside the sandbox; a failure there is a traceback on the sandbox's stderr, shown by
run_in_sandbox.  Helpers: integration/vmhelpers.py, integration/qmp.py.

=====================  ================================================================
test                   checks
=====================  ================================================================
minimal_dev            ``exec --domain-xml`` (id 5, block disk /dev/loop0, hugepages):
                       own mount ns; /dev is a new tmpfs holding exactly the default
                       nodes the host has + /dev/loop0 (same rdev/mode/owner); pts, shm,
                       hugepages still mounted; / is a slave and a later host mount
                       arrives; per-domain hugepage dir (0700); launch record
symlink_chain          /dev/disk/by-id/virtio-x -> ../../loop1 (and a two-hop chain
                       to loop2): every link and the final node appear, nothing else
qemu_hugepages         real QEMU with a memory-backend-file in the per-domain dir:
                       QMP answers, its guest RAM is hugetlb memory mapped from that dir
bad_input[...]         missing device, not a device, dangling link (5); outside /dev,
                       '..', link out of /dev, symlink loop (4);
                       malformed XML / TOML (3), unknown command (7), not root (6):
                       one-line stderr, the sandbox's mount table and /dev unchanged
dry_run_json           ``--dry-run --json`` prints the plan (as root and as nobody) and
                       changes nothing
=====================  ================================================================
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox import privileged, run_in_sandbox

pytestmark = privileged

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
REPO = Path(__file__).resolve().parent.parent
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@functools.cache
def nobody_cannot_run_nsmount() -> str | None:
    """Why ``setpriv ... python -m nsmount`` cannot work here (None if it can).  Runs
    Python as nobody on the host: it only imports, nothing is mounted."""
    if shutil.which("setpriv") is None:
        return "setpriv not installed"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    try:
        r = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import nsmount.cli.main"], env=env,
                           cwd="/", capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run Python as nobody: {exc}"
    if r.returncode != 0:
        return f"cannot run {sys.executable} as nobody: {r.stderr.strip()[-200:]}"
    return None

#: runs first inside every sandbox
PRELUDE = r'''
import json, os, stat, subprocess, sys, time
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(":")[0], "integration"))
from vmhelpers import *

DEFAULTS = ("/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom",
            "/dev/ptmx", "/dev/kvm")
'''


def sandbox(code: str, **kw: object):
    return run_in_sandbox(PRELUDE + textwrap.dedent(code), **kw)  # type: ignore[arg-type]


def test_minimal_dev() -> None:
    res = sandbox('''
        host_mounts = top_mounts()
        host_nodes = device_nodes("/dev")
        assert "/dev/loop0" in host_nodes and "/dev/null" in host_nodes, host_nodes
        want = {p: host_nodes[p] for p in DEFAULTS if p in host_nodes}
        want["/dev/loop0"] = host_nodes["/dev/loop0"]
        assert "/dev/loop1" in host_nodes and "/dev/tty" in host_nodes  # must stay out

        write_domain_xml("/tmp/vm.xml", "guest1", 5, disks=["/dev/loop0"], hugepages=True)
        vm = start_exec(domain_xml="/tmp/vm.xml")
        pid = vm.pid
        try:
            assert mntns(pid) != mntns(), "exec'd command shares the host's mount namespace"
            mounts = top_mounts(pid)

            # /dev: a fresh tmpfs holding exactly the default nodes + the disk
            dev = mounts["/dev"]
            assert dev.fstype == "tmpfs", dev
            assert dev.dev != host_mounts["/dev"].dev, "VM /dev is the host's /dev"
            got = device_nodes(f"/proc/{pid}/root/dev")
            assert got == want, f"\\n got {sorted(got)}\\nwant {sorted(want)}\\n{got}\\n{want}"
            links = [p for p, v in dev_tree(f"/proc/{pid}/root/dev").items() if v[0] == "l"]
            assert links == [], links

            # the host's /dev submounts are still there (same filesystems)
            for sub in ("/dev/pts", "/dev/shm", "/dev/hugepages"):
                assert sub in mounts, (sub, sorted(mounts))
                assert (mounts[sub].fstype, mounts[sub].dev) == \\
                    (host_mounts[sub].fstype, host_mounts[sub].dev), (mounts[sub], host_mounts[sub])
                assert mounts[sub].is_slave, mounts[sub]

            # the root is a slave: host mounts made later arrive, nothing leaks back
            assert mounts["/"].is_slave, mounts["/"]
            os.makedirs("/mnt/late")
            sh(["mount", "-t", "tmpfs", "late", "/mnt/late"])
            with open("/mnt/late/probe", "w") as fh:
                fh.write("late")
            wait_for(lambda: "/mnt/late" in top_mounts(pid), "/mnt/late in the VM", 5)
            with open(f"/proc/{pid}/root/mnt/late/probe") as fh:
                assert fh.read() == "late"
            assert "/mnt/late" not in {m.mountpoint for m in mountinfo(pid)
                                       if m.mountpoint.startswith("/dev")}

            # the per-domain hugepage directory, seen from inside
            hp = f"/proc/{pid}/root/dev/hugepages/libvirt/qemu/5-guest1"
            st = os.stat(hp)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)

            # the launch record
            with open(record_path(pid)) as fh:
                rec = json.load(fh)
            assert record_path(pid) == f"{os.environ['NSMOUNT_STATE_DIR']}/vms/{pid}.json"
            assert rec["pid"] == pid, rec
            assert rec["spec"]["name"] == "guest1" and rec["spec"]["domain_id"] == 5, rec
            assert "/dev/loop0" in json.dumps(rec["spec"]["devices"]), rec
            assert vm.poll() is None
        finally:
            stop(vm)
        # nothing nsmount made is left on the host side (the late tmpfs is ours)
        sh(["umount", "/mnt/late"])
        assert top_mounts() == host_mounts
        print("OK")
    ''', hugetlbfs=["/dev/hugepages"])
    assert res.stdout.rstrip().endswith("OK"), res.describe()


def test_symlink_chain() -> None:
    res = sandbox('''
        os.makedirs("/dev/disk/by-id")
        os.makedirs("/dev/disk/by-path")
        os.symlink("../../loop1", "/dev/disk/by-id/virtio-x")
        # a two-hop chain: by-path -> by-id -> loop2
        os.symlink("../../loop2", "/dev/disk/by-id/virtio-y")
        os.symlink("../by-id/virtio-y", "/dev/disk/by-path/pci-y")
        host = dev_tree("/dev")

        write_domain_xml("/tmp/vm.xml", "chain", 6,
                         disks=["/dev/disk/by-id/virtio-x", "/dev/disk/by-path/pci-y"])
        vm = start_exec(domain_xml="/tmp/vm.xml")
        try:
            tree = dev_tree(f"/proc/{vm.pid}/root/dev")
            for p in ("/dev/disk/by-id/virtio-x", "/dev/loop1", "/dev/disk/by-path/pci-y",
                      "/dev/disk/by-id/virtio-y", "/dev/loop2"):
                assert tree.get(p) == host[p], (p, tree.get(p), host[p])
            assert tree["/dev/disk/by-id/virtio-x"][-1] == "../../loop1"
            assert tree["/dev/disk"][0] == "d" and tree["/dev/disk/by-id"][0] == "d"
            # only what was asked for: no loop0, no other by-id links
            assert "/dev/loop0" not in tree and "/dev/loop3" not in tree, sorted(tree)
            links = sorted(p for p, v in tree.items() if v[0] == "l")
            assert links == ["/dev/disk/by-id/virtio-x", "/dev/disk/by-id/virtio-y",
                             "/dev/disk/by-path/pci-y"], links
            # the links resolve inside the VM
            link_st = os.stat(f"/proc/{vm.pid}/root/dev/disk/by-id/virtio-x")
            assert stat.S_ISBLK(link_st.st_mode) and link_st.st_rdev == os.makedev(7, 1)
            r = sh(["nsenter", "-t", str(vm.pid), "-m", "readlink", "-f",
                    "/dev/disk/by-path/pci-y"])
            assert r.stdout.strip() == "/dev/loop2", r.stdout
        finally:
            stop(vm)
        print("OK")
    ''')
    assert res.stdout.rstrip().endswith("OK"), res.describe()


# ----------------------------------------------------------------------------- QEMU
@pytest.fixture
def hugepages_64() -> object:
    """Raise the global vm.nr_hugepages by 64 (2 MiB pages) for the test, then give them
    back.  Relative, so a concurrent test doing the same is not undone."""
    try:
        with open(NR_HUGEPAGES) as fh:
            old = int(fh.read())
    except OSError as exc:
        pytest.skip(f"no hugepages: {exc}")
    try:
        with open(NR_HUGEPAGES, "w") as fh:
            fh.write(str(old + 64))
        with open(NR_HUGEPAGES) as fh:
            now = int(fh.read())
        if now < old + 32:
            pytest.skip(f"kernel could not allocate hugepages (nr_hugepages {old} -> {now})")
        yield
    finally:
        with open(NR_HUGEPAGES) as fh:
            cur = int(fh.read())
        with open(NR_HUGEPAGES, "w") as fh:
            fh.write(str(max(old, cur - 64)) if cur >= old else str(old))


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 not installed")
def test_qemu_hugepages(hugepages_64: object) -> None:
    res = sandbox('''
        from qmp import QMP

        name, dom_id = "qvm", 7
        hpdir = f"/dev/hugepages/libvirt/qemu/{dom_id}-{name}"
        write_spec("/tmp/vm.toml", name=name, id=dom_id, hugepages=True)
        argv = qemu_argv("-object", "memory-backend-file,id=mem0,size=64M,"
                         f"mem-path={hpdir},prealloc=on,share=on",
                         "-machine", "memory-backend=mem0")
        vm = start_exec(argv, spec="/tmp/vm.toml", timeout=60)
        try:
            try:
                q = QMP.connect("/tmp/qmp.sock", timeout=60)
            except Exception as exc:
                stop(vm)
                raise AssertionError(f"QMP: {exc!r}; QEMU said: {vm.stderr.read()}") from None
            with q:
                assert q.cmd("query-status")["status"] == "prelaunch"
                memdevs = q.cmd("query-memdev")
                assert [(m["id"], m["size"]) for m in memdevs] == [("mem0", 64 << 20)], memdevs
                # QEMU made its backing file in the per-domain dir (inside the VM) and
                # unlinked it; the mapping shows where it came from and that it is
                # hugetlb memory (prealloc=on: all of it)
                maps = hugetlb_mappings(vm.pid)
                mine = {p: kib for p, kib in maps.items() if p.startswith(hpdir + "/")}
                assert mine and sum(mine.values()) == 64 << 10, maps
                # the directory is the host's: QEMU's memory is in the host hugetlbfs
                st = os.stat(f"/proc/{vm.pid}/root{hpdir}")
                assert os.path.samestat(st, os.stat(hpdir))
                assert q.cmd("query-status")["status"] == "prelaunch"
            assert vm.poll() is None, vm.stderr.read()
        finally:
            stop(vm)
        print("OK")
    ''', hugetlbfs=["/dev/hugepages"], timeout=180)
    assert res.stdout.rstrip().endswith("OK"), res.describe()


# ----------------------------------------------------------------------------- bad input
BAD_INPUT = {
    # id: (setup code, nsmount exec args, exit code, words in the message)
    "missing-device": ("write_spec('/tmp/vm.toml', name='b', devices=['/dev/nope0'])",
                       ["--spec", "/tmp/vm.toml", "--", "sleep", "1"], 5, ["/dev/nope0"]),
    "outside-dev": ("write_spec('/tmp/vm.toml', name='b', devices=['/etc/passwd'])",
                    ["--spec", "/tmp/vm.toml", "--", "sleep", "1"], 4, ["/etc/passwd"]),
    "not-a-device": ("open('/dev/notdev', 'w').close();"
                     "write_spec('/tmp/vm.toml', name='b', devices=['/dev/notdev'])",
                     ["--spec", "/tmp/vm.toml", "--", "sleep", "1"], 5, ["/dev/notdev"]),
    "dangling-symlink": ("os.symlink('nothere', '/dev/dangling');"
                         "write_spec('/tmp/vm.toml', name='b', devices=['/dev/dangling'])",
                         ["--spec", "/tmp/vm.toml", "--", "sleep", "1"], 5, ["/dev/dangling"]),
    "symlink-out-of-dev": ("os.symlink('../etc/passwd', '/dev/evil');"
                           "write_spec('/tmp/vm.toml', name='b', devices=['/dev/evil'])",
                           ["--spec", "/tmp/vm.toml", "--", "sleep", "1"], 4, ["/dev/evil"]),
    "symlink-loop": ("os.symlink('b', '/dev/a'); os.symlink('a', '/dev/b');"
                     "write_spec('/tmp/vm.toml', name='b', devices=['/dev/a'])",
                     ["--spec", "/tmp/vm.toml", "--", "sleep", "1"], 4, ["loop"]),
    "malformed-xml": ("open('/tmp/vm.xml', 'w').write(\"<domain><name>b</name\")",
                      ["--domain-xml", "/tmp/vm.xml", "--", "sleep", "1"], 3, ["XML"]),
    "malformed-toml": ("open('/tmp/vm.toml', 'w').write('name = \"b\"\\nid = \\n')",
                       ["--spec", "/tmp/vm.toml", "--", "sleep", "1"], 3, ["/tmp/vm.toml"]),
    "no-command": ("write_spec('/tmp/vm.toml', name='b', devices=['/dev/loop0'])",
                   ["--spec", "/tmp/vm.toml", "--", "no-such-command-xyz"], 7,
                   ["no-such-command-xyz"]),
    "not-root": ("write_spec('/tmp/vm.toml', name='b', devices=['/dev/loop0'])",
                 ["--spec", "/tmp/vm.toml", "--", "sleep", "1"], 6,
                 ["/dev/loop0", "no read-write access"]),  # rootless: not the user's node
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(case: str) -> None:
    setup, args, code, words = BAD_INPUT[case]
    prefix = AS_NOBODY if case == "not-root" else []
    if prefix and nobody_cannot_run_nsmount():
        pytest.skip(str(nobody_cannot_run_nsmount()))
    res = sandbox(f'''
        {setup}
        before = (open("/proc/self/mountinfo").read(), dev_tree("/dev"))
        r = nsm("exec", *{args!r}, prefix={prefix!r})
        err = one_line_error(r, {code!r}, *{words!r})
        print(err)
        assert r.stdout == "", r.stdout
        assert (open("/proc/self/mountinfo").read(), dev_tree("/dev")) == before
        assert not os.path.exists("/run/nsmount/vms") or not os.listdir("/run/nsmount/vms")
        print("OK")
    ''', hugetlbfs=["/dev/hugepages"])
    assert res.stdout.rstrip().endswith("OK"), res.describe()


# ----------------------------------------------------------------------------- dry run
def test_dry_run_json() -> None:
    prefixes = [[]] if nobody_cannot_run_nsmount() else [[], AS_NOBODY]
    res = sandbox('''
        write_domain_xml("/tmp/vm.xml", "dry", 5, disks=["/dev/loop0"], hugepages=True)
        os.chmod("/dev/loop0", 0o666)  # nobody plans rootless: only nodes it may open
        before = (open("/proc/self/mountinfo").read(), dev_tree("/dev"),
                  sorted(os.listdir("/run")))
        hp_before = sorted(os.listdir("/dev/hugepages"))

        def after_unchanged(before):
            return before == (open("/proc/self/mountinfo").read(), dev_tree("/dev"),
                              sorted(os.listdir("/run")))

        for prefix in PREFIXES:
            r = nsm("exec", "--dry-run", "--json", "--domain-xml", "/tmp/vm.xml", "--",
                    "sleep", "1000", prefix=prefix)
            assert r.returncode == 0 and "Traceback" not in r.stderr, (prefix, r)
            doc = json.loads(r.stdout)
            assert doc["spec"]["name"] == "dry" and doc["spec"]["domain_id"] == 5, doc["spec"]
            acts = doc["actions"]
            kinds = [a["action"] for a in acts]
            assert kinds[0] == "create-dev-tmpfs", kinds
            if prefix:  # not root: the rootless plan (integration/test_rootless.py)
                assert doc["rootless"] and kinds[-1] == "seal-namespace", kinds
                assert "make-node" not in kinds and "stack-dev" in kinds, kinds
                assert after_unchanged(before), prefix
                continue
            assert kinds.index("switch-dev") > max(i for i, k in enumerate(kinds)
                                                  if k in ("make-node", "preserve-mount"))
            nodes = {a["entry"]["path"]: a["entry"] for a in acts if a["action"] == "make-node"}
            assert nodes["/dev/loop0"]["kind"] == "blk"
            assert (nodes["/dev/loop0"]["major"], nodes["/dev/loop0"]["minor"]) == (7, 0)
            assert set(nodes) <= set(DEFAULTS) | {"/dev/loop0"}, sorted(nodes)
            assert "/dev/null" in nodes
            preserved = {a["path"] for a in acts if a["action"] == "preserve-mount"}
            assert {"/dev/pts", "/dev/shm", "/dev/hugepages"} <= preserved, preserved
            hp = [a for a in acts if a["action"] == "make-hugepage-dir"]
            assert [a["path"] for a in hp] == ["/dev/hugepages/libvirt/qemu/5-dry"], hp
            for a in acts:
                assert a["description"], a
            after = (open("/proc/self/mountinfo").read(), dev_tree("/dev"),
                     sorted(os.listdir("/run")))
            assert after == before, prefix
            assert sorted(os.listdir("/dev/hugepages")) == hp_before
        print("OK")
    '''.replace("PREFIXES", repr(prefixes)), hugetlbfs=["/dev/hugepages"])
    assert res.stdout.rstrip().endswith("OK"), res.describe()
