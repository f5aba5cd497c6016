"""Face 1 end to end: ``nsmount exec`` builds a QEMU mount namespace with a minimal /dev.

Each function runs inside its own sandbox (the fake hypervisor host), asserts there
and prints ``OK``; integration/test_launch.py runs them.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable

from vmhelpers import (
    dev_tree,
    device_nodes,
    hugetlb_mappings,
    mntns,
    mountinfo,
    nsm,
    one_line_error,
    qmp,
    read_text,
    record_path,
    sh,
    start_vm,
    stop,
    top_mounts,
    wait_for,
    write_domain_xml,
    write_spec,
)

DEFAULTS = ("/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom",
            "/dev/ptmx", "/dev/kvm")


def minimal_dev() -> None:
    host_mounts = top_mounts()
    host_nodes = device_nodes("/dev")
    assert "/dev/loop0" in host_nodes and "/dev/null" in host_nodes, host_nodes
    want = {p: host_nodes[p] for p in DEFAULTS if p in host_nodes}
    want["/dev/loop0"] = host_nodes["/dev/loop0"]
    assert "/dev/loop1" in host_nodes and "/dev/tty" in host_nodes  # must stay out

    write_domain_xml("/tmp/vm.xml", "guest1", 5, disks=["/dev/loop0"], hugepages=True)
    vm = start_vm(domain_xml="/tmp/vm.xml")
    pid = vm.pid
    try:
        assert mntns(pid) != mntns(), "exec'd command shares the host's mount namespace"
        mounts = top_mounts(pid)

        # /dev: a fresh tmpfs holding exactly the default nodes + the disk
        dev = mounts["/dev"]
        assert dev.fstype == "tmpfs", dev
        assert dev.dev != host_mounts["/dev"].dev, "VM /dev is the host's /dev"
        got = device_nodes(f"/proc/{pid}/root/dev")
        assert got == want, f"\n got {sorted(got)}\nwant {sorted(want)}\n{got}\n{want}"
        links = [p for p, v in dev_tree(f"/proc/{pid}/root/dev").items() if v[0] == "l"]
        assert links == [], links

        # the host's /dev submounts are still there (same filesystems)
        for sub in ("/dev/pts", "/dev/shm", "/dev/hugepages"):
            assert sub in mounts, (sub, sorted(mounts))
            assert (mounts[sub].fstype, mounts[sub].dev) == \
                (host_mounts[sub].fstype, host_mounts[sub].dev), (mounts[sub], host_mounts[sub])
            assert mounts[sub].is_slave, mounts[sub]

        # the root is a slave: host mounts made later arrive, nothing leaks back
        assert mounts["/"].is_slave, mounts["/"]
        os.makedirs("/mnt/late")
        sh(["mount", "-t", "tmpfs", "late", "/mnt/late"])
        with open("/mnt/late/probe", "w") as fh:
            fh.write("late")
        wait_for(lambda: "/mnt/late" in top_mounts(pid), "/mnt/late in the VM", 5)
        assert read_text(f"/proc/{pid}/root/mnt/late/probe") == "late"
        assert "/mnt/late" not in {m.mountpoint for m in mountinfo(pid)
                                   if m.mountpoint.startswith("/dev")}

        # the per-domain hugepage directory, seen from inside
        hp = f"/proc/{pid}/root/dev/hugepages/libvirt/qemu/5-guest1"
        st = os.stat(hp)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)

        # the launch record
        rec = json.loads(read_text(record_path(pid)))
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


def symlink_chain() -> None:
    os.makedirs("/dev/disk/by-id")
    os.makedirs("/dev/disk/by-path")
    os.symlink("../../loop1", "/dev/disk/by-id/virtio-x")
    # a two-hop chain: by-path -> by-id -> loop2
    os.symlink("../../loop2", "/dev/disk/by-id/virtio-y")
    os.symlink("../by-id/virtio-y", "/dev/disk/by-path/pci-y")
    host = dev_tree("/dev")

    write_domain_xml("/tmp/vm.xml", "chain", 6,
                     disks=["/dev/disk/by-id/virtio-x", "/dev/disk/by-path/pci-y"])
    vm = start_vm(domain_xml="/tmp/vm.xml")
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


def qemu_hugepages() -> None:
    """A real QEMU whose guest RAM is a memory-backend-file in the per-domain dir."""
    name, dom_id = "qvm", 7
    hpdir = f"/dev/hugepages/libvirt/qemu/{dom_id}-{name}"
    write_spec("/tmp/vm.toml", name=name, id=dom_id, hugepages=True)
    vm = start_vm(spec="/tmp/vm.toml", qemu=(
        "-object", f"memory-backend-file,id=mem0,size=64M,mem-path={hpdir},prealloc=on,"
        "share=on", "-machine", "memory-backend=mem0"))
    try:
        with qmp(vm, timeout=60) as q:
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
        assert vm.poll() is None, vm.stderr.read() if vm.stderr else ""
    finally:
        stop(vm)
    print("OK")


# ----------------------------------------------------------------------------- bad input
def _spec_with(device: str) -> None:
    write_spec("/tmp/vm.toml", name="b", devices=[device])


def _not_a_device() -> None:
    open("/dev/notdev", "w").close()
    _spec_with("/dev/notdev")


def _dangling() -> None:
    os.symlink("nothere", "/dev/dangling")
    _spec_with("/dev/dangling")


def _out_of_dev() -> None:
    os.symlink("../etc/passwd", "/dev/evil")
    _spec_with("/dev/evil")


def _loop() -> None:
    os.symlink("b", "/dev/a")
    os.symlink("a", "/dev/b")
    _spec_with("/dev/a")


def _write(path: str, text: str) -> Callable[[], None]:
    def setup() -> None:
        with open(path, "w") as fh:
            fh.write(text)
    return setup


SPEC_ARGS = ["--spec", "/tmp/vm.toml", "--", "sleep", "1"]

#: id: (setup, nsmount exec args, exit code, words in the message)
BAD_INPUT: dict[str, tuple[Callable[[], None], list[str], int, list[str]]] = {
    "missing-device": (lambda: _spec_with("/dev/nope0"), SPEC_ARGS, 5, ["/dev/nope0"]),
    "outside-dev": (lambda: _spec_with("/etc/passwd"), SPEC_ARGS, 4, ["/etc/passwd"]),
    "not-a-device": (_not_a_device, SPEC_ARGS, 5, ["/dev/notdev"]),
    "dangling-symlink": (_dangling, SPEC_ARGS, 5, ["/dev/dangling"]),
    "symlink-out-of-dev": (_out_of_dev, SPEC_ARGS, 4, ["/dev/evil"]),
    "symlink-loop": (_loop, SPEC_ARGS, 4, ["loop"]),
    "malformed-xml": (_write("/tmp/vm.xml", "<domain><name>b</name"),
                      ["--domain-xml", "/tmp/vm.xml", "--", "sleep", "1"], 3, ["XML"]),
    "malformed-toml": (_write("/tmp/vm.toml", 'name = "b"\nid = \n'), SPEC_ARGS, 3,
                       ["/tmp/vm.toml"]),
    "no-command": (lambda: _spec_with("/dev/loop0"),
                   ["--spec", "/tmp/vm.toml", "--", "no-such-command-xyz"], 7,
                   ["no-such-command-xyz"]),
    # rootless (issue 12): the plan is built, but /dev/loop0 is not the user's to open
    "not-root": (lambda: _spec_with("/dev/loop0"), SPEC_ARGS, 6,
                 ["/dev/loop0", "no read-write access"]),
}


def _host_state() -> tuple[str, object]:
    return read_text("/proc/self/mountinfo"), dev_tree("/dev")


def bad_input(case: str, prefix: list[str]) -> None:
    """``nsmount exec`` of bad input: one-line error with the right exit code, nothing
    on stdout, the sandbox's mount table and /dev unchanged, no launch record."""
    setup, args, code, words = BAD_INPUT[case]
    setup()
    before = _host_state()
    r = nsm("exec", *args, prefix=prefix)
    err = one_line_error(r, code, *words)
    print(err)
    assert r.stdout == "", r.stdout
    assert _host_state() == before
    assert not os.path.exists("/run/nsmount/vms") or not os.listdir("/run/nsmount/vms")
    print("OK")


# ----------------------------------------------------------------------------- dry run
def dry_run_json(prefixes: list[list[str]]) -> None:
    """``exec --dry-run --json`` (as root, and as nobody when it can) prints the plan
    and changes nothing."""
    write_domain_xml("/tmp/vm.xml", "dry", 5, disks=["/dev/loop0"], hugepages=True)
    os.chmod("/dev/loop0", 0o666)  # nobody plans rootless: only nodes it may open

    def state() -> tuple[str, object, list[str]]:
        return (read_text("/proc/self/mountinfo"), dev_tree("/dev"), sorted(os.listdir("/run")))

    before = state()
    hp_before = sorted(os.listdir("/dev/hugepages"))
    for prefix in prefixes:
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
            assert state() == before, prefix
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
        assert state() == before, prefix
        assert sorted(os.listdir("/dev/hugepages")) == hp_before
    print("OK")
