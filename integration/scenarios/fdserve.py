"""Device fds from the service (issue 12, items 2 and 4): ``open-device`` and
``device-bind`` for unprivileged users, as the device policy allows.

Each function runs inside its own sandbox with the real service (:func:`serve.serve`)
and a policy that grants uid 65534 (:data:`vmhelpers.NOBODY`) the loop devices.  The
attacks are made by real unprivileged processes: this module run as a module
(``python -m scenarios.fdserve MODE ARGS``) as that user is the client, printing one
JSON line of what it saw.  Each scenario prints one JSON line; integration/
test_fdserve.py asserts on it.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Any

from vmhelpers import NOBODY, as_user, comm, emit, loop_device, nsm, python_m, qmp, read_text, \
    start_vm, stop, wait_for, write_spec

from .serve import LOG, SOCK, serve, talk

POLICY = "/tmp/policy.toml"
OTHER = 65533  # a second unprivileged user, not in the policy
GRANT = f"""\
[[allow]]
users = [{NOBODY}]
devices = ["/dev/loop*"]
access = "rw"
"""


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def as_nobody(*argv: str, uid: int = NOBODY) -> subprocess.Popen[bytes]:
    """A stand-in VM process of ``uid`` (ending as ``sleep``), for its pidfd."""
    p = subprocess.Popen([*as_user(uid), *argv])
    wait_for(lambda: comm(p.pid) == "sleep",
             f"{argv[0]} as {uid}", 10)
    return p


def client(mode: str, *args: object, uid: int = NOBODY, timeout: float = 60) -> Any:
    """This module's client ``mode`` run as ``uid``: its JSON line."""
    r = python_m("scenarios.fdserve", mode, *args, user=uid, timeout=timeout, check=False)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def service_up(svc: subprocess.Popen[bytes]) -> bool:
    return svc.poll() is None and bool(talk({"op": "status"})["ok"])


# ----------------------------------------------------------------- scenarios
def hostile() -> None:
    """The hostile clients of the issue against the real service; fd count stable."""
    with open(POLICY, "w") as fh:
        fh.write("[[allow]]\nusers = [1]\ndevices = ['/dev/x']\naccess = 'all'\n")
    c = nsm("serve", "--policy", POLICY, timeout=30)
    res: dict[str, Any] = {"bad_at_start": [c.returncode, c.stderr]}
    with open(POLICY, "w") as fh:
        fh.write(GRANT)
    svc = serve("--policy", POLICY)
    res["modes"] = [oct(stat.S_IMODE(os.stat(SOCK).st_mode)),
                    oct(stat.S_IMODE(os.stat(os.path.dirname(SOCK)).st_mode))]
    vm = as_nobody("sleep", "1000")
    other_vm = as_nobody("sleep", "1000", uid=OTHER)
    root_proc = subprocess.Popen(["sleep", "1000"])
    try:
        # warm-up: the first requests load modules and NSS lookups into the service
        client("good", vm.pid, 3)
        before = fd_count(svc.pid)
        res["attacks"] = client("attacks", vm.pid, root_proc.pid, timeout=120)
        res["other_user"] = client("good", vm.pid, 1, uid=OTHER)
        res["other_user_own"] = client("good", other_vm.pid, 1, uid=OTHER)
        # root: a pidfd attached to a non-fd op is closed, the op answered
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(SOCK)
        pidfd = os.pidfd_open(root_proc.pid)
        got = []
        for fds in ([pidfd], [pidfd, pidfd, pidfd]):
            socket.send_fds(s, [b'{"v":1,"op":"status","id":9}\n'], fds)
            ans = json.loads(s.makefile().readline())
            got.append(ans["ok"] or ans["error"]["code"])
        res["root_status_with_fds"] = got
        s.close()
        # a line still arriving, one byte and one fd per write: held fds never pile up
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(SOCK)
        req = b'{"v":1,"op":"status","id":10}\n'
        socket.send_fds(s, [req[:1]], [pidfd])
        for _ in range(300):
            socket.send_fds(s, [b" "], [pidfd])
        time.sleep(0.3)
        res["held_mid_line"] = fd_count(svc.pid) - before  # the connection + 1 fd
        s.sendall(req[1:])
        res["held_answer"] = json.loads(s.makefile().readline()).get("error")
        s.close()
        os.close(pidfd)
        time.sleep(0.3)
        res["fds"] = [before, fd_count(svc.pid)]
        # a bad policy on SIGHUP: one line naming file and line; the last good one kept
        with open(POLICY, "a") as fh:
            fh.write('[[allow]]\nusers = ["x"]\ndevices = ["/etc/shadow"]\n')
        svc.send_signal(signal.SIGHUP)
        wait_for(lambda: "last good policy" in read_text(LOG), "policy error", 10)
        res["bad_policy"] = next(ln for ln in read_text(LOG).splitlines()
                                 if "last good policy" in ln)
        res["after_bad_policy"] = client("good", vm.pid, 1)
        # no policy: nothing granted, the socket closed again to root
        os.unlink(POLICY)
        svc.send_signal(signal.SIGHUP)
        wait_for(lambda: stat.S_IMODE(os.stat(SOCK).st_mode) == 0o600, "socket 0600", 10)
        res["closed_modes"] = [oct(stat.S_IMODE(os.stat(SOCK).st_mode)),
                               oct(stat.S_IMODE(os.stat(os.path.dirname(SOCK)).st_mode))]
        res["alive"] = service_up(svc)
        log = read_text(LOG)
        res["traceback"] = "Traceback" in log
        res["log_granted"] = next((ln for ln in log.splitlines()
                                   if "open-device: granted" in ln), "")
        res["log_refused"] = next((ln for ln in log.splitlines()
                                   if "open-device: refused" in ln and "/dev/vda" in ln), "")
    finally:
        for p in (vm, other_vm, root_proc):
            p.kill()
            p.wait()
        svc.terminate()
        svc.wait(10)
    emit(**res)


def qemu_end_to_end() -> None:
    """The user's rootless QEMU gets a loop device it cannot open from the service:
    ``nsmount device add --fd-to-qmp`` run by the user, then ``blockdev-add`` of
    ``/dev/fdset/N``; /dev/vda (not in the policy) refused, exit 17."""
    from .fdpass import NSM_QMP, NSM_SOCK, blk

    with open(POLICY, "w") as fh:
        fh.write(GRANT)
    svc = serve("--policy", POLICY)
    res: dict[str, Any] = {}
    with loop_device("/tmp/disk.img") as loop:
        os.chmod(loop, 0o600)  # root's: the user cannot open it itself
        vm = None
        try:
            spec = write_spec("/tmp/vm.toml", name="u")
            vm = start_vm(spec=spec, qemu=(*NSM_QMP,), user=NOBODY, timeout=90)
            pid = vm.pid
            res["vm_uid"] = os.stat(f"/proc/{pid}").st_uid
            with qmp(vm, timeout=60) as q:
                res["before"] = "error" in q.execute("blockdev-add", blk("d0", loop))
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, f"pid:{pid}", loop,
                        user=NOBODY)
                res["add"] = [c.returncode, c.stdout, c.stderr]
                res["blockdev"] = q.execute("blockdev-add", blk("d1", c.stdout.strip()))
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, f"pid:{pid}", "/dev/vda",
                        user=NOBODY)
                res["vda"] = [c.returncode, c.stderr]
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, "--read-only", "--json",
                        f"pid:{pid}", loop, user=NOBODY)
                res["ro"] = [c.returncode, c.stdout, c.stderr]
                # no service: the user's own rights (refused on a 0600 node, a 0666
                # one works as before the service existed)
                svc.terminate()
                svc.wait(10)
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, f"pid:{pid}", loop,
                        user=NOBODY)
                res["no_service"] = [c.returncode, c.stderr]
                os.chmod(loop, 0o666)
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, f"pid:{pid}", loop,
                        user=NOBODY)
                res["no_service_own"] = [c.returncode, c.stdout]
                res["nodes"] = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
                res["status"] = q.cmd("query-status")["status"]
            res["vm_has_loop"] = os.path.lexists(f"/proc/{pid}/root{loop}")
        finally:
            if vm is not None:
                stop(vm)
            svc.terminate()
            svc.wait(10)
    res["loop"] = loop
    res["traceback"] = "Traceback" in read_text(LOG)
    emit(**res)


def bind() -> None:
    """``device-bind``: the policy's nodes bound into the user's rootless VM's /dev
    through the service; refusals for everything else."""
    from .rootless import host_snapshot, mounts_by_point

    with open(POLICY, "w") as fh:
        fh.write(f"""[[allow]]
users = [{NOBODY}]
devices = ["/dev/loop0", "/dev/loop3", "/dev/loop4"]
access = "rw"

[[allow]]
users = [{NOBODY}]
devices = ["/dev/loop1"]
access = "ro"
""")
    svc = serve("--policy", POLICY)
    res: dict[str, Any] = {}
    vms = []
    try:
        spec = write_spec("/tmp/vm.toml", name="b", devices=[])
        vm = start_vm(spec=spec, script="ln -s /etc/shadow /dev/loop3", user=NOBODY)
        vms.append(vm)
        pid = vm.pid
        before = host_snapshot()
        res["before"] = os.path.lexists(f"/proc/{pid}/root/dev/loop0")
        res["rw"] = client("bind", pid, "/dev/loop0", 1)
        res["rw_again"] = client("bind", pid, "/dev/loop0", 1)
        res["ro"] = client("bind", pid, "/dev/loop1", 1)
        st = os.stat(f"/proc/{pid}/root/dev/loop0")
        res["loop0"] = [stat.S_ISBLK(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev)]
        mi = mounts_by_point(pid)
        res["mounts"] = {k: mi.get(k, "").split(" - ")[0].split()[5:6]
                         for k in ("/dev/loop0", "/dev/loop1")}
        res["symlink"] = client("bind", pid, "/dev/loop3", 1)
        # the CLI: a non-root `nsmount device add` asks the service
        c = nsm("device", "add", f"pid:{pid}", "/dev/loop4", user=NOBODY)
        res["cli"] = [c.returncode, c.stdout, c.stderr]
        c = nsm("device", "add", f"pid:{pid}", "/dev/loop4", user=NOBODY)
        res["cli_again"] = [c.returncode, c.stdout, c.stderr]
        c = nsm("device", "add", f"pid:{pid}", "/dev/vda", user=NOBODY)
        res["cli_vda"] = [c.returncode, c.stdout, c.stderr]
        res["vda"] = client("bind", pid, "/dev/vda", 1)
        # a second user: with the first user's VM, and with a rootless VM of its own
        res["other_pid"] = client("bind", pid, "/dev/loop0", 1, uid=OTHER)
        other_vm = start_vm(spec=write_spec("/tmp/o.toml", name="o", devices=[]),
                            script=":", user=OTHER)
        vms.append(other_vm)
        res["other_own"] = client("bind", other_vm.pid, "/dev/loop0", 1, uid=OTHER)
        # the user's own processes that are not an nsmount-built rootless VM
        plain = as_nobody("sleep", "1000")
        keeps_dev = as_nobody("unshare", "-Urm", "sleep", "1000")
        res["plain"] = client("bind", plain.pid, "/dev/loop0", 1)
        res["keeps_host_dev"] = client("bind", keeps_dev.pid, "/dev/loop0", 1)
        for p in (plain, keeps_dev):
            p.kill()
            p.wait()
        res["unchanged"] = host_snapshot() == before
        res["alive"] = service_up(svc)
        log = read_text(LOG)
        res["traceback"] = "Traceback" in log
        res["log"] = [ln for ln in log.splitlines() if "device-bind:" in ln]
    finally:
        for v in vms:
            stop(v)
        svc.terminate()
        svc.wait(10)
    emit(**res)


# ----------------------------------------------------------------- the clients
def _answer(s: socket.socket) -> tuple[dict[str, Any], list[int]]:
    buf = b""
    fds: list[int] = []
    while b"\n" not in buf:
        data, anc, _f, _a = s.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4),
                                      socket.MSG_CMSG_CLOEXEC)
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(raw[:len(raw) - len(raw) % 4])
                fds += list(a)
        if not data:
            break
        buf += data
    return json.loads(buf.split(b"\n")[0]), fds


def _ask(s: socket.socket, obj: dict[str, Any], fds: list[int]) -> tuple[Any, int]:
    """One request with ``fds`` attached: (answer or error code, fds received)."""
    line = json.dumps({"v": 1, **obj}).encode() + b"\n"
    if fds:
        socket.send_fds(s, [line], fds)
    else:
        s.sendall(line)
    ans, got = _answer(s)
    for fd in got:
        os.close(fd)
    return (ans["result"] if ans["ok"] else ans["error"]), len(got)


def _conn() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(SOCK)
    return s


def user_good(pid: str, n: str) -> None:
    """``n`` requests through the library call; what came back."""
    from nsmount.errors import NsmountError
    from nsmount.faces.fdclient import obtain_device

    out: list[Any] = []
    for _ in range(int(n)):
        try:
            with obtain_device("/dev/loop0", pid=int(pid), socket_path=SOCK) as dev:
                st = os.fstat(dev.fd)
                out.append([stat.S_ISBLK(st.st_mode), os.major(st.st_rdev), dev.node.path])
        except NsmountError as exc:
            out.append([type(exc).__name__, exc.exit_code, str(exc)])
    print(json.dumps(out[-1]))


def user_attacks(pid_s: str, root_pid_s: str) -> None:
    """Every attack of the issue, as an unprivileged user; what each got."""
    from nsmount.faces.fdclient import obtain_device

    pid, root_pid = int(pid_s), int(root_pid_s)
    pidfd = os.pidfd_open(pid)
    res: dict[str, Any] = {}
    s = _conn()
    good = {"op": "open-device", "path": "/dev/loop0"}
    res["good"] = _ask(s, good, [pidfd])
    res["no_pidfd"] = _ask(s, good, [])
    null = os.open("/dev/null", os.O_RDONLY)
    res["not_a_pidfd"] = _ask(s, good, [null])
    res["two_fds"] = _ask(s, good, [pidfd, null])
    res["many_fds"] = _ask(s, good, [null] * 200)
    res["root_pidfd"] = _ask(s, good, [os.pidfd_open(root_pid)])
    res["vda"] = _ask(s, {**good, "path": "/dev/vda"}, [pidfd])
    res["etc"] = _ask(s, {**good, "path": "/etc/shadow"}, [pidfd])
    res["dotdot"] = _ask(s, {**good, "path": "/dev/../etc/shadow"}, [pidfd])
    res["list_with_pidfd"] = _ask(_conn(), {"op": "list"}, [pidfd])
    res["malformed"] = _ask(_conn(), {"op": "open-device", "path": 7}, [pidfd])
    res["garbage"] = _answer_raw(b"\x00\xff{{{\n", [null])
    res["oversized"] = _answer_raw(b"x" * (5 << 20), [pidfd])
    # one byte and one fd per write, 500 times, then the end of the line: the service
    # never holds more than one of them and refuses the line
    c = _conn()
    req = json.dumps({"v": 1, **good}).encode() + b"\n"
    socket.send_fds(c, [req[:1]], [null])
    for _ in range(499):
        socket.send_fds(c, [b" "], [null])
    c.sendall(req[1:])
    res["trickle"] = _answer(c)[0].get("error")
    c.close()
    # 1000 requests on one connection, each answered with an fd
    ok = 0
    for _ in range(1000):
        ans, n = _ask(s, good, [pidfd])
        ok += n == 1 and ans.get("major") == 7
    res["thousand"] = ok
    # disconnect mid-answer: ask, then go before reading
    for _ in range(50):
        c = _conn()
        socket.send_fds(c, [json.dumps({"v": 1, **good}).encode() + b"\n"], [pidfd])
        c.close()
    # 50 concurrent clients.  The 50 above may still count against this uid's 64
    # connections for a moment (a loaded machine, CI); a client the service refuses
    # as busy tries again, as a launcher would, for at most 5 s
    _ask(s, good, [pidfd])  # the service has read everything sent before this
    results: list[Any] = []
    busy: list[int] = []

    def one() -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                with obtain_device("/dev/loop0", pid=pid, socket_path=SOCK,
                                   timeout=30) as dev:
                    results.append(os.major(os.fstat(dev.fd).st_rdev))
                return
            except Exception as exc:
                if "connections for this uid" in str(exc) and time.monotonic() < deadline:
                    busy.append(1)
                    time.sleep(0.05)
                    continue
                results.append(str(exc))
                return

    threads = [threading.Thread(target=one) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res["concurrent"] = results
    res["concurrent_busy_retries"] = len(busy)
    s.close()
    os.close(null)
    print(json.dumps(res))


def _answer_raw(data: bytes, fds: list[int]) -> Any:
    c = _conn()
    try:
        sent = socket.send_fds(c, [data], fds)
        c.sendall(data[sent:])
        c.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        ans, got = _answer(c)
    except (ValueError, ConnectionResetError):
        return "no answer"
    finally:
        c.close()
    for fd in got:
        os.close(fd)
    return ans.get("error", ans)


def user_bind(pid: str, path: str, write: str) -> None:
    """``fdclient.bind_device`` as this user: the result, or the error."""
    from nsmount.errors import NsmountError
    from nsmount.faces.fdclient import bind_device

    try:
        print(json.dumps(bind_device(path, pid=int(pid), write=write == "1",
                                     socket_path=SOCK)))
    except NsmountError as exc:
        print(json.dumps([type(exc).__name__, exc.exit_code, str(exc)]))


if __name__ == "__main__":  # the unprivileged clients
    {"good": user_good, "attacks": user_attacks,
     "bind": user_bind}[sys.argv[1]](*sys.argv[2:])


def bind_never_propagates() -> None:
    """device-bind on a host whose /dev is shared (systemd's default): the user, root
    in its own user namespace, bind-mounts its own file over the node nsmount bound
    for it.  That mount must stay in the user's namespace: the host's node is
    unchanged (before the fix, the bound clone was a peer of the host's /dev and the
    host's /dev/null became the user's file)."""
    from nsmount.faces.devbind import bind_device
    from nsmount.kernel import consts as C
    from nsmount.kernel import syscalls

    syscalls.mount(None, "/dev", None, C.MS_SHARED)  # the sandbox's own /dev
    os.makedirs("/tmp/u", exist_ok=True)
    with open("/tmp/u/evil", "w") as fh:
        fh.write("EVIL\n")
    os.chmod("/tmp/u", 0o755)
    os.chmod("/tmp/u/evil", 0o644)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # the user's rootless VM: its own user + mount namespace, a tmpfs /dev
        code = 0
        try:
            os.close(w1)
            os.close(r2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            syscalls.unshare(C.CLONE_NEWUSER | C.CLONE_NEWNS)
            os.write(w2, b"u")
            os.read(r1, 1)  # maps written
            syscalls.mount("none", "/dev", "tmpfs", 0, None)
            os.write(w2, b"d")
            os.read(r1, 1)  # bound
            try:
                syscalls.mount("/tmp/u/evil", "/dev/null", None, C.MS_BIND, None)
                res = "mounted"
            except OSError as exc:
                res = exc.strerror or "error"
            os.write(w2, res.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(r1)
    os.close(w2)
    os.read(r2, 1)
    with open(f"/proc/{pid}/uid_map", "w") as fh:
        fh.write(f"0 {NOBODY} 1")
    with open(f"/proc/{pid}/setgroups", "w") as fh:
        fh.write("deny")
    with open(f"/proc/{pid}/gid_map", "w") as fh:
        fh.write(f"0 {NOBODY} 1")
    os.write(w1, b"x")
    os.read(r2, 1)
    pidfd = os.pidfd_open(pid)
    b = os.fork()
    if b == 0:  # the service's job
        try:
            bind_device(pidfd, NOBODY, NOBODY, "/dev/null", read_only=False)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(b, 0)
    os.write(w1, b"x")
    inner = b""
    while chunk := os.read(r2, 4096):
        inner += chunk
    os.waitpid(pid, 0)
    st = os.stat("/dev/null")
    emit(ok=True, bind_status=status, inner=inner.decode(), host_is_chr=stat.S_ISCHR(st.st_mode),
         host_rdev=[os.major(st.st_rdev), os.minor(st.st_rdev)])


def flood_never_read() -> None:
    """A client that sends request lines and never reads the answers: the service
    stops reading it once answers pile up (bounded memory) and keeps serving others."""
    svc = serve()

    def rss_kib() -> int:
        for line in read_text(f"/proc/{svc.pid}/status").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    before = rss_kib()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCK)
    s.setblocking(False)
    sent = 0
    deadline = time.time() + 20
    line = b"x\n" * 4096
    while time.time() < deadline and sent < (64 << 20):
        try:
            sent += s.send(line)
        except BlockingIOError:
            break  # the service stopped reading us: the socket buffers are full
    t0 = time.perf_counter()
    ok_other = talk({"op": "status"})["ok"]
    t_other = time.perf_counter() - t0
    after = rss_kib()
    s.close()
    alive = service_up(svc)
    svc.terminate()
    svc.wait(10)
    emit(ok=True, sent=sent, grew_kib=after - before, other=ok_other, t_other=t_other,
         alive=alive)
