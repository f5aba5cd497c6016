"""``nsmount serve`` in a sandbox playing a hypervisor host: real processes, real
namespaces, real kernel events (fanotify on the sandbox's mount namespace, the machine's
uevents).

Each function starts the service in its sandbox (:func:`serve`), talks to it on
:data:`SOCK`, asserts there and prints one JSON line with ``ok``;
integration/test_serve.py runs them.  Run as a module (``python -m scenarios.serve
SOCK``), it is the client of the unauthorized-request case: one ``list`` request, the
answer printed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Any

from vmhelpers import (
    HUGETLBFS_MAGIC,
    MB,
    NOBODY,
    PY,
    STATE_DIR,
    check_vm,
    emit,
    mount_hugetlbfs,
    nsm,
    python_m,
    read_text,
    reconnect_json,
    sh,
    start_vm,
    start_vms,
    statfs_type,
    stop,
    visible_mounts,
    wait_for,
    write_spec,
)

SOCK = "/run/nsmount/nsmount.sock"
LOG = "/tmp/serve.log"


# ----------------------------------------------------------------- the service
def serve(*args: str, log: str = LOG) -> subprocess.Popen[bytes]:
    """``nsmount serve -v ARGS`` in the background (stderr appended to ``log``); returns
    once it answers a status request."""
    with open(log, "a") as fh:
        p = subprocess.Popen([PY, "-m", "nsmount", "serve", "-v", *args], stderr=fh,
                             stdout=subprocess.DEVNULL)

    def up() -> bool:
        assert p.poll() is None, read_text(log)[-3000:]
        try:
            return bool(talk({"op": "status"})["ok"])
        except OSError:
            return False

    wait_for(up, "the service", 20)
    return p


def talk_raw(data: bytes, timeout: float = 30, path: str = SOCK) -> bytes:
    """Send ``data`` on a new connection, shut the sending side, read one answer line."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the service answered before reading it all (too large)
    buf = b""
    while b"\n" not in buf:
        c = s.recv(65536)
        if not c:
            break
        buf += c
    s.close()
    return buf


def talk(obj: dict[str, Any], timeout: float = 30) -> Any:
    """One request (protocol version 1) and its decoded answer."""
    obj = dict({"v": 1}, **obj)
    return json.loads(talk_raw((json.dumps(obj) + "\n").encode(), timeout))


def settle(timeout: float = 60) -> None:
    """Until the service has nothing pending or running (twice in a row)."""
    deadline = time.time() + timeout
    quiet = 0
    while quiet < 2:
        assert time.time() < deadline, talk({"op": "status"})
        st = talk({"op": "status"})["result"]
        busy = st["batch_running"] or st["jobs"] or st["queued"] or st["pending_vms"]
        quiet = 0 if busy else quiet + 1
        time.sleep(0.15)


def listed() -> tuple[Any, dict[int, Any]]:
    """``nsmount list --json``: (where the list came from, pid -> VM)."""
    r = nsm("list", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    vms = d["vms"] if isinstance(d, dict) else d
    return d.get("from"), {v["pid"]: v for v in vms}


def visible_hugetlbfs(pid: int, i: int, mp: str = "/dev/hugepages") -> bool:
    """VM guest<i> sees a hugetlbfs at ``mp`` with its per-domain dir."""
    p = f"/proc/{pid}/root{mp}"
    try:
        return (statfs_type(p) == HUGETLBFS_MAGIC
                and os.path.isdir(f"{p}/libvirt/qemu/{i + 1}-guest{i}"))
    except OSError:
        return False


def assert_no_traceback(log: str = LOG) -> None:
    text = read_text(log)
    assert "Traceback" not in text, text[-3000:]


def assert_reconnect_clean() -> dict[str, Any]:
    """``nsmount reconnect`` finds nothing to do (exit 0); returns its document."""
    rc, rep, _ = reconnect_json()
    assert rc == 0, (rc, rep["summary"], [o for o in rep["vms"] if o["status"] != "ok"][:3])
    return rep  # type: ignore[no-any-return]


# ----------------------------------------------------------------- scenarios
def events_end_to_end() -> None:
    n_vms = 50
    svc = serve("--metrics-file", "/run/nsmount.prom")
    # loop5's node is not on this host yet: the VM that lists it (optional) starts without it
    os.unlink("/dev/loop5")
    procs = []
    for i in range(n_vms):
        devices = [{"path": "/dev/loop5", "optional": True}] if i == 0 else None
        spec = write_spec(f"/tmp/vm{i}.toml", name=f"guest{i}", id=i + 1, devices=devices)
        procs.append(start_vm(spec=spec, timeout=60))
    pids = [vm.pid for vm in procs]
    assert not os.path.exists(f"/proc/{pids[0]}/root/dev/loop5")
    wait_for(lambda: set(pids) <= set(listed()[1]), "the service to track all VMs", 30)
    settle()

    # 1. hugetlbfs appears on the host: every VM gets it, with no command run
    assert not any(visible_hugetlbfs(pid, i) for i, pid in enumerate(pids))
    t0 = time.time()
    mount_hugetlbfs("/dev/hugepages", "2M")
    wait_for(lambda: all(visible_hugetlbfs(pid, i) for i, pid in enumerate(pids)),
             "hugetlbfs in every VM", 30)
    latency = time.time() - t0
    bad = {i: p for i, pid in enumerate(pids)
           if (p := check_vm(pid, i, [("/dev/hugepages", 2 * MB)]))}
    assert not bad, bad

    # 2. the optional device: node made on the host, a real uevent
    os.mknod("/dev/loop5", 0o660 | stat.S_IFBLK, os.makedev(7, 5))
    os.chown("/dev/loop5", 0, 6)
    os.chmod("/dev/loop5", 0o660)

    def has_loop5() -> bool:
        try:
            st = os.stat(f"/proc/{pids[0]}/root/dev/loop5")
        except FileNotFoundError:
            return False
        return stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 5) \
            and st.st_gid == 6 and stat.S_IMODE(st.st_mode) == 0o660

    deadline = time.time() + 20
    while not has_loop5():
        assert time.time() < deadline, read_text(LOG)[-3000:]
        with open("/sys/block/loop5/uevent", "w") as fh:
            fh.write("change")
        time.sleep(0.5)
    assert not os.path.exists(f"/proc/{pids[1]}/root/dev/loop5")  # only the VM that names it

    # 3. five VMs exit: gone from list and from the records
    for vm in procs[n_vms - 5:]:
        stop(vm)
    dead = pids[n_vms - 5:]
    wait_for(lambda: not (set(dead) & set(listed()[1])), "exited VMs to leave list", 20)
    src, now = listed()
    assert src == "service" and set(now) == set(pids[:n_vms - 5]), (src, sorted(now))
    assert not any(os.path.exists(f"/run/nsmount/vms/{pid}.json") for pid in dead)
    assert not [n for n in os.listdir("/run/nsmount/locks") if int(n.split("-")[0]) in dead]
    settle()
    rep = assert_reconnect_clean()
    assert rep["summary"]["total"] == n_vms - 5, rep["summary"]
    prom = read_text("/run/nsmount.prom")
    assert f"nsmount_vms_managed {n_vms - 5}" in prom and "nsmount_repairs_total" in prom, prom

    # 4. kill -9 while a batch runs; a mount added while it is down; restart converges
    mount_hugetlbfs("/mnt/huge", "2M")
    mount_hugetlbfs("/dev/hugepages2", "2M")
    time.sleep(0.06)
    svc.kill()
    svc.wait()
    mount_hugetlbfs("/dev/hugepages3", "2M")
    svc = serve("--metrics-file", "/run/nsmount.prom")
    mounts = [("/dev/hugepages", 2 * MB), ("/dev/hugepages2", 2 * MB),
              ("/dev/hugepages3", 2 * MB), ("/mnt/huge", 2 * MB)]

    def converged() -> bool:
        return all(not check_vm(pid, i, mounts) for i, pid in enumerate(pids[:n_vms - 5]))

    wait_for(converged, "convergence after a restart", 40)
    settle()
    bad = {i: p for i, pid in enumerate(pids[:n_vms - 5]) if (p := check_vm(pid, i, mounts))}
    assert not bad, bad
    assert_reconnect_clean()
    assert_no_traceback()
    svc.terminate()
    assert svc.wait(10) == 0
    emit(ok=True, latency=latency)


#: raw request -> the error code the service must answer with
BAD_REQUESTS = {
    b"{not json\n": "bad-request",
    b"[1, 2]\n": "bad-request",
    b'{"op": "list"}\n': "unsupported-version",
    b'{"v": 2, "op": "list"}\n': "unsupported-version",
    b'{"v": 1, "op": "format-disk"}\n': "unknown-op",
    b'{"v": 1, "op": "repair", "pid": "1; rm -rf /"}\n': "bad-request",
    b'{"v": 1, "op": "repair", "pid": 1, "domain": "x"}\n': "bad-request",
    b'{"v": 1, "op": "started", "domain": "../../etc/passwd"}\n': "bad-request",
    b'{"v": 1, "op": "device-add", "pid": 5, "paths": ["/dev/../etc/shadow"]}\n':
        "bad-request",
    b'{"v": 1, "op": "list", "timeout": -1}\n': "bad-request",
    b'{"v": 1, "op": "list", "extra": 1}\n': "bad-request",
    b"\xff\xfe\n": "bad-request",
}


def err_of(raw: bytes) -> tuple[str, str]:
    """(code, message) of the error the service answers ``raw`` with."""
    ans = json.loads(talk_raw(raw))
    assert ans["ok"] is False, ans
    return ans["error"]["code"], ans["error"]["message"]


def socket_abuse() -> None:
    with open("/tmp/nsmount.conf", "w") as fh:
        fh.write('mounts = ["/mnt/huge"]\n')
    svc = serve("--config", "/tmp/nsmount.conf")
    a = start_vm(spec=write_spec("/tmp/a.toml", name="guest0", id=1))
    b = start_vm(spec=write_spec("/tmp/b.toml", name="guest1", id=2))
    wait_for(lambda: {a.pid, b.pid} <= set(listed()[1]), "tracking", 20)

    for raw, code in BAD_REQUESTS.items():
        got = err_of(raw)
        assert got[0] == code and got[1], (raw, got)
    # a pid that is not a VM (the service's own init): pinned and refused, no harm done
    ans = talk({"op": "repair", "pid": 1, "timeout": 5})
    assert ans["ok"] and ans["result"]["vms"][0]["status"] == "failed", ans
    assert ans["result"]["vms"][0]["error"], ans
    # oversized: an error, then the connection is closed
    code, msg = err_of(b"x" * (5 << 20))
    assert code == "too-large", (code, msg)
    # unauthorized: a non-root client (the socket opened up by mistake)
    os.chmod("/run/nsmount", 0o711)
    os.chmod(SOCK, 0o666)
    r = python_m("scenarios.serve", SOCK, user=NOBODY)
    ans = json.loads(r.stdout)
    assert ans["ok"] is False and ans["error"]["code"] == "unauthorized", ans
    os.chmod(SOCK, 0o600)
    # 0600: the kernel refuses the connection; nsmount list says so clearly
    r = nsm("list", user=NOBODY, env={"NSMOUNT_STATE_DIR": STATE_DIR})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("nsmount: error:"), r.stderr

    # still serving; a frozen VM times out, the other VM's request is answered meanwhile
    os.kill(a.pid, signal.SIGSTOP)
    os.makedirs("/mnt/huge", exist_ok=True)
    s_slow = socket.socket(socket.AF_UNIX)
    s_slow.connect(SOCK)
    s_slow.sendall(b'{"v":1,"op":"repair","pid":%d,"timeout":3,"id":"slow"}\n' % a.pid)
    t0 = time.time()
    fast = talk({"op": "repair", "pid": b.pid, "timeout": 3, "id": "fast"})
    t_fast = time.time() - t0
    assert fast["ok"] and fast["id"] == "fast", fast
    s_slow.settimeout(30)
    slow = json.loads(s_slow.recv(1 << 20).split(b"\n")[0])
    t_slow = time.time() - t0
    os.kill(a.pid, signal.SIGCONT)
    assert t_fast < 2.5, t_fast
    assert slow["id"] == "slow", slow
    # the stopped VM either finished (nothing blocked) or was abandoned with a reason
    if slow["ok"]:
        assert slow["result"]["vms"][0]["status"] in ("ok", "repaired", "failed"), slow
    else:
        assert slow["error"]["code"] in ("timeout", "failed"), slow

    # hotplug through the socket
    ans = talk({"op": "device-add", "pid": b.pid, "paths": ["/dev/loop3"], "timeout": 10})
    assert ans["ok"] and ans["result"]["status"] == "repaired", ans
    assert stat.S_ISBLK(os.stat(f"/proc/{b.pid}/root/dev/loop3").st_mode)
    ans = talk({"op": "device-remove", "pid": b.pid, "paths": ["/dev/loop3"], "timeout": 10})
    assert ans["ok"] and ans["result"]["status"] == "repaired", ans
    assert not os.path.exists(f"/proc/{b.pid}/root/dev/loop3")

    # the hook through the service, and the one-line socat request of docs/protocol.rst
    lv = "/run/libvirt/qemu"
    os.makedirs(lv, exist_ok=True)
    with open(f"{lv}/dom1.pid", "w") as fh:
        fh.write(f"{b.pid}\n")
    r = subprocess.run([PY, "-m", "nsmount", "libvirt-hook", "dom1", "started", "begin", "-"],
                       input="", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "via the service" in r.stderr, (r.returncode, r.stderr)
    t0 = time.perf_counter()
    r = subprocess.run("printf '{\"v\":1,\"op\":\"reconnect\",\"domain\":\"%s\","
                       "\"timeout\":30}\\n' dom1 | socat -t 40 - "
                       f"UNIX-CONNECT:{SOCK}", shell=True, capture_output=True, text=True)
    t_socat = time.perf_counter() - t0
    assert '"ok":true' in r.stdout, (r.stdout, r.stderr)

    # a bad config on SIGHUP: one line naming file and line; the last good one is kept
    with open("/tmp/nsmount.conf", "w") as fh:
        fh.write('mounts = ["/mnt/huge"]\ntimeout = "soon"\n')
    svc.send_signal(signal.SIGHUP)
    wait_for(lambda: "nsmount.conf:2:" in read_text(LOG), "config error", 10)
    line = next(ln for ln in read_text(LOG).splitlines() if "nsmount.conf:2:" in ln)
    assert "keeping the last good" in line, line
    assert talk({"op": "status"})["result"]["config"] == "/tmp/nsmount.conf"
    assert talk({"op": "list"})["ok"]
    assert svc.poll() is None
    assert_no_traceback()
    emit(ok=True, t_fast=t_fast, t_slow=t_slow, t_socat=t_socat)


def flapping_mount() -> None:
    serve()
    vms = start_vms(10)
    wait_for(lambda: {vm.pid for vm in vms.values()} <= set(listed()[1]), "tracking", 20)
    settle()
    os.makedirs("/dev/hugepages", exist_ok=True)
    for k in range(100):
        sh(["mount", "-t", "hugetlbfs", "hugetlbfs", "/dev/hugepages"])
        if k < 99:
            # the service may hold the mount point open for an instant (EBUSY): retry
            for _ in range(100):
                if sh(["umount", "/dev/hugepages"], check=False).returncode == 0:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("umount kept failing")
    try:
        wait_for(lambda: all(visible_hugetlbfs(vm.pid, i) for i, vm in vms.items()),
                 "convergence", 30)
    except AssertionError:
        bad = [i for i, vm in vms.items() if not visible_hugetlbfs(vm.pid, i)]
        lines = [ln for ln in read_text(LOG).splitlines() if "mount event" not in ln]
        raise AssertionError(f"no convergence for VMs {bad}; service log:\n"
                             + "\n".join(lines[-60:])) from None
    settle()
    probs = {}
    for i, vm in vms.items():
        n = visible_mounts(vm.pid).count("/dev/hugepages")
        if n != 1 or not visible_hugetlbfs(vm.pid, i):
            probs[i] = n
    assert not probs, (probs, [ln for ln in read_text(f"/proc/{vms[min(probs)].pid}/mountinfo")
                               .splitlines() if "hugepages" in ln], read_text(LOG)[-4000:])
    # a VM whose run met the mount gone mid-way failed that run (and was redone); a final
    # reconnect finds nothing to do
    assert_reconnect_clean()
    st = talk({"op": "status"})["result"]
    merged = request_burst({i: vm.pid for i, vm in vms.items()})
    emit(ok=True, batches=st["counters"]["batches"], failures=st["counters"]["failures"],
         merged=merged)


def request_burst(pids: dict[int, int], copies: int = 3) -> int:
    """``repair`` of every VM ``copies`` times, all sent at once (8 per connection):
    the requests read in one turn of the service's loop go to the workers together;
    each is answered with its own VM's report.  Returns how many such groups the
    service logged."""
    reqs = [(i, pid) for _ in range(copies) for i, pid in pids.items()]
    conns = []
    for k in range(0, len(reqs), 8):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(SOCK)
        chunk = reqs[k:k + 8]
        s.sendall(b"".join(b'{"v":1,"op":"repair","pid":%d,"id":"%d-%d"}\n' % (pid, k + j, pid)
                           for j, (_i, pid) in enumerate(chunk)))
        conns.append((s, len(chunk)))
    answers = []
    for s, want in conns:
        buf = b""
        while buf.count(b"\n") < want:
            c = s.recv(1 << 20)
            assert c, "the service closed the connection"
            buf += c
        s.close()
        answers += [json.loads(ln) for ln in buf.splitlines() if ln.strip()]
    assert len(answers) == len(reqs), len(answers)
    for a in answers:
        pid = int(a["id"].split("-")[1])
        assert a["ok"], a
        vms = a["result"]["vms"]
        assert [o["pid"] for o in vms] == [pid] and vms[0]["status"] in ("ok", "repaired"), a
        assert a["result"]["summary"]["total"] == 1, a
    merged = [ln for ln in read_text(LOG).splitlines() if "handed to the workers together" in ln]
    assert merged, "no request was merged"
    return len(merged)


def unauthorized_client(path: str) -> None:
    """One ``list`` request on ``path`` (as whoever runs this), the answer printed."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"v":1,"op":"list"}\n')
    print(s.recv(4096).decode())


if __name__ == "__main__":  # the client of the unauthorized-request case
    unauthorized_client(sys.argv[1])
