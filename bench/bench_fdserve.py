#!/usr/bin/env python3
"""Benchmark: a device fd handed over by the service (``open-device``, issue 12).

    python3 bench/bench_fdserve.py [--n 1000] [--json PATH]

Inside ``tests/sandbox.py``'s sandbox.  ``nsmount serve`` runs with a device policy
granting uid 65534 ``/dev/loop*``; a stand-in VM (``sleep``) runs as that user.  A
forked client drops to uid 65534 and asks for ``/dev/loop0`` N times on ONE
connection with :func:`nsmount.faces.fdclient.obtain_device` (``sock=``: the
library call the CLI uses, pidfd_open of the VM included, the received fd checked
and closed).  Side by side, in the same run, interleaved in blocks of 50:

  service       obtain_device over the service's socket (uid 65534)
  echo floor    the same request line with the pidfd attached, to a minimal Python
                SCM_RIGHTS server that answers each line with a dup of an fd it opened
                once: socket round trip + fd passing + Python, nothing else
  direct open   root opening the node itself with ``fdpass.open_device`` (resolve,
                verify, open: the checks the service makes too)
  os.open       root's bare ``os.open("/dev/loop0", O_RDWR)`` + close

Reported: p50/p99 (ms) per row and the ratios service/row.  Target (issue 12): the
service p50 <= 1 ms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RESULTS, header, run_sandbox_main, write_result

USER = 65534
BLOCK = 50


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def sandbox_main(cfg: dict[str, Any]) -> None:
    import array
    import json
    import os
    import socket
    import subprocess
    import time

    from nsmount.faces import fdpass
    from nsmount.faces.fdclient import obtain_device

    n = cfg["n"]
    sock_path = "/run/nsmount/nsmount.sock"
    echo_path = "/run/echo.sock"
    with open("/tmp/policy.toml", "w") as fh:
        fh.write(f'[[allow]]\nusers = [{USER}]\ndevices = ["/dev/loop*"]\n')
    log = open("/tmp/serve.log", "a")  # noqa: SIM115 - the service's stderr, for the run
    svc = subprocess.Popen([sys.executable, "-m", "nsmount", "serve", "-q", "--policy",
                            "/tmp/policy.toml"], stderr=log)
    vm = subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}",
                           "--clear-groups", "sleep", "1000"])
    while not os.path.exists(sock_path):
        time.sleep(0.02)

    # the echo floor: a forked minimal SCM_RIGHTS server, one fd opened once
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(echo_path)
    os.chmod(echo_path, 0o666)
    lsock.listen(4)
    echo_pid = os.fork()
    if echo_pid == 0:
        dev = os.open("/dev/loop0", os.O_RDWR | os.O_CLOEXEC)
        c, _ = lsock.accept()
        buf = b""
        while True:
            data, anc, _f, _a = c.recvmsg(1 << 16, socket.CMSG_SPACE(4),
                                          socket.MSG_CMSG_CLOEXEC)
            for _lvl, _kind, raw in anc:
                for fd in array.array("i", raw[:len(raw) - len(raw) % 4]):
                    os.close(fd)
            if not data:
                os._exit(0)
            buf += data
            while b"\n" in buf:
                _, buf = buf.split(b"\n", 1)
                c.sendmsg([b'{"v":1,"ok":true,"result":{}}\n'],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dev]))])
    lsock.close()

    # the unprivileged client: service and echo rows, interleaved in blocks
    r, w = os.pipe()
    cpid = os.fork()
    if cpid == 0:
        os.close(r)
        os.setgroups([])
        os.setresgid(USER, USER, USER)
        os.setresuid(USER, USER, USER)
        svc_s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        svc_s.connect(sock_path)
        echo_s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        echo_s.connect(echo_path)
        line = json.dumps({"v": 1, "op": "open-device", "path": "/dev/loop0",
                           "write": True}).encode() + b"\n"
        out: dict[str, list[float]] = {"service": [], "echo floor": []}
        for _ in range(3):  # warm-up
            obtain_device("/dev/loop0", pid=vm.pid, sock=svc_s).close()
        done = 0
        while done < n:
            k = min(BLOCK, n - done)
            for _ in range(k):
                t0 = time.perf_counter()
                obtain_device("/dev/loop0", pid=vm.pid, sock=svc_s).close()
                out["service"].append((time.perf_counter() - t0) * 1000)
            for _ in range(k):
                t0 = time.perf_counter()
                pidfd = os.pidfd_open(vm.pid)
                socket.send_fds(echo_s, [line], [pidfd])
                os.close(pidfd)
                buf = b""
                fds: list[int] = []
                while b"\n" not in buf:
                    data, anc, _f, _a = echo_s.recvmsg(1 << 16, socket.CMSG_SPACE(16),
                                                       socket.MSG_CMSG_CLOEXEC)
                    for _lvl, _kind, raw in anc:
                        fds += array.array("i", raw[:len(raw) - len(raw) % 4])
                    buf += data
                json.loads(buf)
                for fd in fds:
                    os.fstat(fd)
                    os.close(fd)
                out["echo floor"].append((time.perf_counter() - t0) * 1000)
            done += k
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 20):
        chunks.append(chunk)
    os.waitpid(cpid, 0)
    rows: dict[str, list[float]] = json.loads(b"".join(chunks))

    # root's own opens, in the same sandbox, same node
    rows["direct open (root)"], rows["os.open (root)"] = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        fdpass.open_device("/dev/loop0").close()
        rows["direct open (root)"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        os.close(os.open("/dev/loop0", os.O_RDWR | os.O_CLOEXEC))
        rows["os.open (root)"].append((time.perf_counter() - t0) * 1000)
    os.kill(echo_pid, 9)
    os.waitpid(echo_pid, 0)
    fds_svc = len(os.listdir(f"/proc/{svc.pid}/fd"))
    svc.terminate()
    svc.wait()
    vm.kill()
    vm.wait()
    print(json.dumps({"rows": {k: {"p50": _pct(v, 50), "p99": _pct(v, 99), "n": len(v)}
                               for k, v in rows.items()},
                      "service_fds_at_end": fds_svc}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--json", default=str(RESULTS / "fdserve.json"))
    a = ap.parse_args()
    print(header("fdserve", n=a.n))
    res, elapsed = run_sandbox_main("bench_fdserve", {"n": a.n}, hugetlbfs=[], timeout=300)
    rows = res["rows"]
    svc = rows["service"]["p50"]
    print(f"{'row':<22} {'p50':>8} {'p99':>8} {'service/row':>12}   (ms, n={a.n})")
    for name, r in rows.items():
        print(f"{name:<22} {r['p50']:8.3f} {r['p99']:8.3f} {svc / r['p50']:11.2f}x")
    print(f"target: service p50 <= 1 ms: {'ok' if svc <= 1.0 else 'MISSED'}")
    write_result(a.json, "fdserve", {"params": vars(a), "elapsed": elapsed, **res})


if __name__ == "__main__":
    main()
