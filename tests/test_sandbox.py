"""Tests of the test sandbox itself (tests/sandbox.py, tests/sandbox_init.py)."""

from __future__ import annotations

import json
import os
import stat
import time
from textwrap import dedent

import pytest
from sandbox import (
    REPO_ROOT,
    SandboxResult,
    privileged,
    run_in_sandbox,
    sandbox_available,
)

pytestmark = [privileged, pytest.mark.privileged]

HUGETLBFS_MAGIC = 0x958458F6
TMPFS_MAGIC = 0x01021994
DEVPTS_MAGIC = 0x1CD1
MQUEUE_MAGIC = 0x19800202

# Helper prepended to sandbox code: statfs f_type of a path, via ctypes.
STATFS_HELPER = """
import ctypes, json, os
_libc = ctypes.CDLL(None, use_errno=True)
def f_type(path):
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86_64
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.fstatfs(fd, buf) != 0:
            raise OSError(ctypes.get_errno(), "fstatfs", path)
    finally:
        os.close(fd)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type is the first field
def mounts():
    out = {}
    for line in open("/proc/self/mountinfo"):
        left, right = line.split(" - ")
        f = left.split()
        out[f[4]] = {"fstype": right.split()[0], "optional": f[6:],
                     "opts": f[5] + "," + right.split()[2]}
    return out
"""

NODES = ["null", "zero", "full", "random", "urandom", "tty", "ptmx", "kvm", "net/tun",
         "vhost-net", "loop-control", *(f"loop{i}" for i in range(8))]


def host_mountinfo() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


@pytest.fixture(autouse=True)
def host_unchanged() -> object:
    before = host_mountinfo()
    yield
    assert host_mountinfo() == before, "the real host's mount table changed"


def test_available() -> None:
    assert sandbox_available()


def test_result_json_uses_last_json_line() -> None:
    res = SandboxResult(0, 'noise\n{"a": 1}\n[1, 2]\ntrailing text\n', "")
    assert res.json() == [1, 2]
    with pytest.raises(AssertionError):
        SandboxResult(0, "no json here\n", "").json()


def test_runs_code_with_repo_on_path_and_env() -> None:
    res = run_in_sandbox("""
        import json, os, sys
        import nsmount
        print("some log line")
        print(json.dumps({
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "path0": sys.path[0],
            "nsmount": list(nsmount.__path__),
            "state": os.environ["NSMOUNT_STATE_DIR"],
            "libvirt": os.environ["NSMOUNT_LIBVIRT_STATE_DIR"],
            "extra": os.environ["EXTRA"],
            "main": __name__,
            "stdin": os.read(0, 10).decode(),
        }))
    """, env={"EXTRA": "yes"})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = res.json()
    assert data["pid"] == 2 and data["ppid"] == 1  # init is PID 1, code is its child
    assert data["path0"] == repo
    assert os.path.join(repo, "nsmount") in data["nsmount"]
    assert data["state"] == "/run/nsmount"
    assert data["libvirt"] == "/run/libvirt/qemu"
    assert data["extra"] == "yes"
    assert data["main"] == "__main__"
    assert data["stdin"] == ""  # stdin is the sandbox's /dev/null


def test_failure_raises_with_output() -> None:
    with pytest.raises(AssertionError) as exc:
        run_in_sandbox("print('before'); raise ValueError('boom')")
    text = str(exc.value)
    assert "before" in text and "ValueError: boom" in text
    assert "raise ValueError('boom')" in text  # traceback shows the source line
    res = run_in_sandbox("import sys; sys.exit(3)", check=False)
    assert res.returncode == 3


def test_private_tmpfs_run_tmp_mnt() -> None:
    res = run_in_sandbox(STATFS_HELPER + dedent("""
        m = mounts()
        print(json.dumps({p: [f_type(p), os.listdir(p), m[p]["optional"]]
                          for p in ("/run", "/tmp", "/mnt")}))
    """))
    carried = {}  # a checkout living under /tmp or /run is carried into the sandbox
    for tree in ("/run", "/tmp", "/mnt"):
        if str(REPO_ROOT).startswith(tree + "/"):
            carried[tree] = [str(REPO_ROOT)[len(tree) + 1:].split("/")[0]]
    for path, (ftype, entries, optional) in res.json().items():
        assert ftype == TMPFS_MAGIC, path
        assert entries == carried.get(path, []), path
        assert any(o.startswith("shared:") for o in optional), path


def test_dev_is_tmpfs_with_host_nodes() -> None:
    expected = {}
    for name in NODES:
        try:
            st = os.lstat(f"/dev/{name}")
        except FileNotFoundError:
            continue
        expected[name] = [st.st_mode, st.st_rdev, st.st_uid, st.st_gid]
    assert {"null", "zero", "full", "random", "urandom", "tty", "ptmx"} <= expected.keys()
    res = run_in_sandbox(STATFS_HELPER + dedent(f"""
        nodes = {{}}
        for name in {NODES!r}:
            try:
                st = os.lstat("/dev/" + name)
            except FileNotFoundError:
                continue
            nodes[name] = [st.st_mode, st.st_rdev, st.st_uid, st.st_gid]
        links = {{n: os.readlink("/dev/" + n) for n in ("fd", "stdin", "stdout", "stderr")}}
        with open("/dev/zero", "rb") as f:
            zeros = f.read(4)
        with open("/dev/null", "wb") as f:
            f.write(b"x")
        print(json.dumps({{
            "dev": f_type("/dev"),
            "mode": os.stat("/dev").st_mode,
            "nodes": nodes,
            "links": links,
            "zeros": zeros.hex(),
            "listing": sorted(os.listdir("/dev")),
        }}))
    """))
    data = res.json()
    assert data["dev"] == TMPFS_MAGIC
    assert stat.S_IMODE(data["mode"]) == 0o755
    assert data["nodes"] == expected
    assert data["links"] == {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
                             "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}
    assert data["zeros"] == "00000000"
    # Nothing else from the real /dev leaked in.
    assert "vda" not in data["listing"] and "console" not in data["listing"]


def test_dev_submounts() -> None:
    res = run_in_sandbox(STATFS_HELPER + dedent("""
        import pty
        m = mounts()
        primary, secondary = pty.openpty()
        print(json.dumps({
            "types": {p: f_type(p) for p in ("/dev/pts", "/dev/shm", "/dev/mqueue")},
            "pts_opts": m["/dev/pts"]["opts"],
            "shm_mode": os.stat("/dev/shm").st_mode,
            "pty": os.ttyname(secondary),
            "ptys": os.listdir("/dev/pts"),
        }))
    """))
    data = res.json()
    assert data["types"] == {"/dev/pts": DEVPTS_MAGIC, "/dev/shm": TMPFS_MAGIC,
                             "/dev/mqueue": MQUEUE_MAGIC}
    assert "mode=620" in data["pts_opts"] and "ptmxmode=666" in data["pts_opts"]
    assert stat.S_IMODE(data["shm_mode"]) == 0o1777
    # A private devpts instance: our pty is number 0 and the only one.
    assert data["pty"] == "/dev/pts/0"
    assert sorted(data["ptys"]) == ["0", "ptmx"]


def test_root_is_shared_and_propagates() -> None:
    res = run_in_sandbox(STATFS_HELPER + dedent("""
        import subprocess, sys
        root_optional = mounts()["/"]["optional"]
        # A "VM" namespace that is a slave of the sandbox host sees host mounts made later.
        os.mkdir("/run/later")
        script = (
            "import os, time\\n"
            "print('ready', flush=True)\\n"
            "while not os.path.exists('/run/later/flag'): time.sleep(0.01)\\n"
            "print('seen', flush=True)\\n"
        )
        vm = subprocess.Popen(["unshare", "--mount", "--propagation", "slave",
                               sys.executable, "-c", script],
                              stdout=subprocess.PIPE, text=True)
        assert vm.stdout.readline().strip() == "ready"
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/run/later"],
                       check=True)
        open("/run/later/flag", "w").close()
        out, _ = vm.communicate(timeout=20)
        print(json.dumps({"root": root_optional, "vm": out.strip()}))
    """))
    data = res.json()
    assert any(o.startswith("shared:") for o in data["root"])
    assert data["vm"] == "seen"


def test_hugetlbfs() -> None:
    have_1g = os.path.isdir("/sys/kernel/mm/hugepages/hugepages-1048576kB")
    res = run_in_sandbox(STATFS_HELPER + dedent("""
        m = mounts()
        print(json.dumps({
            "hp": f_type("/dev/hugepages"),
            "hp_opts": m["/dev/hugepages"]["opts"],
            "hp_shared": m["/dev/hugepages"]["optional"],
            "hp1g": f_type("/dev/hugepages1G") if os.path.isdir("/dev/hugepages1G") else None,
            "mnt": f_type("/mnt/huge"),
            "reported": json.loads(os.environ["NSMOUNT_SANDBOX_HUGETLBFS"]),
        }))
    """), hugetlbfs=["/dev/hugepages", "/dev/hugepages1G:1G", "/mnt/huge"])
    data = res.json()
    assert data["hp"] == HUGETLBFS_MAGIC
    assert data["mnt"] == HUGETLBFS_MAGIC
    assert any(o.startswith("shared:") for o in data["hp_shared"])
    if have_1g:
        assert data["hp1g"] == HUGETLBFS_MAGIC
        assert data["reported"] == ["/dev/hugepages", "/dev/hugepages1G", "/mnt/huge"]
    else:
        assert data["hp1g"] is None
        assert data["reported"] == ["/dev/hugepages", "/mnt/huge"]


def test_hugetlbfs_refuses_real_filesystem_paths() -> None:
    path = "/var/tmp/nsmount-sandbox-must-not-exist"
    assert not os.path.exists(path)
    with pytest.raises(AssertionError, match="setup failed"):
        run_in_sandbox("print('unreachable')", hugetlbfs=[path])
    assert not os.path.exists(path)


def test_background_process_dies_with_sandbox() -> None:
    token = f"{4000 + os.getpid() % 1000}.{time.time_ns() % 10**6}"
    res = run_in_sandbox(f"""
        import json, subprocess
        # Double-fork a daemon that outlives the code's process (reparented to PID 1).
        p = subprocess.Popen(["sh", "-c", "sleep {token} >/dev/null 2>&1 & echo $!"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
        inner = int(p.stdout.readline())
        p.wait()
        with open("/proc/%d/stat" % inner) as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        print(json.dumps({{"inner": inner, "ppid": ppid}}))
    """)
    data = res.json()
    assert data["ppid"] == 1  # the orphan was adopted by the sandbox's init
    # Found on the host by its unique command line, it must be gone by now (the kernel
    # may need a moment to finish reaping after the namespace's init exited).
    deadline = time.monotonic() + 5
    while _sleepers(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sleepers(token) == []


def _sleepers(token: str) -> list[int]:
    """Host PIDs of `sleep TOKEN` processes."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if cmd[:2] == [b"sleep", token.encode()]:
            found.append(int(entry))
    return found


def test_timeout_kills_everything() -> None:
    token = f"{5000 + os.getpid() % 1000}.{time.time_ns() % 10**6}"
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out"):
        run_in_sandbox(f"""
            import subprocess, time
            subprocess.Popen(["sleep", "{token}"])
            print("started", flush=True)
            time.sleep(1000)
        """, timeout=3)
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 5
    while _sleepers(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sleepers(token) == []


def test_sandbox_mounts_do_not_leak(sandbox: object) -> None:
    before = host_mountinfo()
    res = run_in_sandbox("""
        import json, subprocess
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/mnt"], check=True)
        subprocess.run(["mount", "--make-rshared", "/"], check=True)
        print(json.dumps({"ok": True}))
    """)
    assert res.json() == {"ok": True}
    assert host_mountinfo() == before


def test_parallel_sandboxes_are_independent() -> None:
    from concurrent.futures import ThreadPoolExecutor

    code = """
        import json, os
        os.makedirs("/run/nsmount", exist_ok=True)
        name = "/run/nsmount/mine"
        existed = os.path.exists(name)
        open(name, "w").close()
        print(json.dumps({"existed": existed}))
    """
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_in_sandbox(code).json(), range(4)))
    assert results == [{"existed": False}] * 4
    assert not os.path.exists("/run/nsmount/mine")


def test_setup_time_is_small() -> None:
    times = [run_in_sandbox("pass").elapsed for _ in range(3)]
    assert min(times) < 2.0, times
    print(json.dumps({"sandbox_seconds": times}))
