#!/usr/bin/env python3
"""Benchmark: reconnect N running VMs through the service, the CLI and the C floor.

    python3 bench/bench_floor.py [--n 1000] [--rounds 3] [--op reconnect|repair]
                                 [--metrics] [--profile] [--sample] [--json PATH]

Inside ``tests/sandbox.py``'s sandbox (a throwaway mount+PID namespace playing a
hypervisor host).  N stand-in VMs (``launcher.launch(spec, ["sleep", "1000"])``: a
private mount namespace, a tmpfs /dev, a launch record), hugetlbfs at /dev/hugepages
on the sandbox host, ``nsmount serve`` running.  Before every timed run the VMs are
reset: the hugetlbfs is detached inside every VM (by the C program's ``reset`` mode)
and the per-domain dirs are removed on the host, so each run does the whole work
again (a mount and three directories per VM).  Rows, interleaved round-robin:

  service  N requests on the service socket, all sent at once (125 connections x 8 in
           flight, the protocol's limit per connection), as libvirt's hook sends them
           on a daemon restart: ``reconnect`` with the domain name (libvirt pid files
           are written for the stand-ins) or, with ``--op repair``, ``repair`` with the
           pid; timed from the first request sent to the last answer read
  service-noop  the same requests with every VM already right (no reset before it):
           what a libvirt daemon restart costs when the service has kept the VMs right
  cli      ``python3 -m nsmount reconnect --no-scan --json -q``, start to exit
  floor    bench/floor_reconnect.c (``cc -O2``): per VM pidfd_open, setns(CLONE_NEWNS),
           mkdir, mount hugetlbfs, mkdir -p the per-domain dir, in one process; its own
           loop time (``floor``) and its process start to exit (``floor-proc``)
  py-floor bench/floor_reconnect.py: the same loop in Python through nsmount's ctypes
           syscall layer (its loop time): what the interpreter costs for the bare steps
  checked-floor  the same C program's ``checked`` mode: the syscalls nsmount's pipeline
           makes for such a VM (the checks of the trust model), in its order, in C, with
           no parsing or planning (its loop time): what the checks cost the kernel

Every run's end state is verified (each VM sees a hugetlbfs with its per-domain
dir).  Target (issue 10): service <= 10x the floor.  ``--profile`` adds one more
service run, the service restarted under cProfile with the per-VM function of every
warm worker profiled too (:data:`PROFILED_SERVE`), and prints where the time goes.
Without a C compiler the floor rows are skipped with the reason.  JSON: bench/results/floor.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BENCH_DIR, RESULTS, header, run_sandbox_main, write_result

HP = "/dev/hugepages"


def compile_floor(name: str = "floor_reconnect") -> tuple[str | None, str]:
    """(path of the compiled ``bench/NAME.c``, or None; why not).  One program has the
    plain floor, its ``reset`` and the ``checked`` floor."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler (cc/gcc/clang) on PATH"
    out = RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(BENCH_DIR / f"{name}.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"{cc} failed: {r.stderr.strip()[-500:]}"
    return str(out), ""


def sandbox_main(cfg: dict[str, Any]) -> None:
    import benchlib
    import json
    import os
    import selectors
    import socket
    import time

    from nsmount.faces.launcher import launch
    from nsmount.model.spec import VmSpec

    py, n, floor = sys.executable, cfg["n"], cfg["floor"]
    sock_path = "/run/nsmount/nsmount.sock"
    log = open("/tmp/serve.log", "a")  # noqa: SIM115 - the service's stderr, for the run

    def talk(obj: dict[str, Any]) -> Any:
        return benchlib.talk(obj, sock_path)

    def settle() -> None:
        benchlib.settle(sock_path)

    names = [f"guest{i}" for i in range(n)]
    t = time.perf_counter()
    vms = [launch(VmSpec(name=names[i], domain_id=i + 1), ["sleep", "1000"]) for i in range(n)]
    for vm in vms:
        while Path(f"/proc/{vm.pid}/comm").read_text().strip() != "sleep":
            time.sleep(0.002)
    t_launch = time.perf_counter() - t
    vm_lines = "".join(f"{vm.pid} {i + 1} {names[i]}\n" for i, vm in enumerate(vms))
    if cfg["op"] == "reconnect":  # the hook names the domain: libvirt's pid files
        os.makedirs("/run/libvirt/qemu", exist_ok=True)
        for i, vm in enumerate(vms):
            with open(f"/run/libvirt/qemu/{names[i]}.pid", "w") as fh:
                fh.write(f"{vm.pid}\n")
    os.makedirs(HP, exist_ok=True)
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", HP], check=True)
    svc = subprocess.Popen([py, "-m", "nsmount", "serve",
                            *(["--metrics-file", "/run/nsmount.prom"] if cfg["metrics"] else [])],
                           stderr=log)
    while not os.path.exists(sock_path):
        time.sleep(0.02)
    while talk({"op": "status"})["vms"] < n:
        time.sleep(0.1)
    settle()

    def visible(i: int) -> bool:
        return benchlib.sees_hugetlbfs(vms[i].pid, HP, f"libvirt/qemu/{i + 1}-{names[i]}")

    reset_prog = floor or cfg["reset_fallback"]

    def reset() -> None:
        if reset_prog:
            r = subprocess.run([reset_prog, "reset", HP], input=vm_lines, capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stderr
        else:  # no compiler: nsenter does it (slower, untimed)
            for vm in vms:
                subprocess.run(["nsenter", "-t", str(vm.pid), "-m", "umount", "-l", HP],
                               check=False, capture_output=True)
        shutil.rmtree(f"{HP}/libvirt", ignore_errors=True)  # the replayed mount's dirs
        left = [i for i in range(0, n, max(1, n // 50)) if visible(i)]
        assert not left, f"reset left VMs {left[:5]} with their hugetlbfs"

    def cpu_split() -> dict[str, float]:
        """CPU seconds so far of the service's own process and of its live workers,
        with the workers' kernel (system) part apart: the syscalls themselves."""
        import psutil

        me = psutil.Process(svc.pid)
        own = sum(me.cpu_times()[:2])
        kids = kids_sys = 0.0
        for c in me.children(recursive=True):
            try:
                t = c.cpu_times()
            except psutil.NoSuchProcess:
                continue
            kids += t.user + t.system
            kids_sys += t.system
        return {"service": own, "workers": kids, "workers_system": kids_sys}

    def run_service() -> dict[str, Any]:
        per_conn = 8
        reqs = []
        for i, vm in enumerate(vms):
            target = {"domain": names[i]} if cfg["op"] == "reconnect" else {"pid": vm.pid}
            reqs.append((json.dumps({"v": 1, "op": cfg["op"], "id": i, "timeout": 60,
                                     **target}) + "\n").encode())
        sel = selectors.DefaultSelector()
        conns = []
        for k in range(0, n, per_conn):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock_path)
            conns.append((s, b"".join(reqs[k:k + per_conn]), len(reqs[k:k + per_conn])))
        answers: dict[int, Any] = {}
        cpu0 = cpu_split()
        t0 = time.perf_counter()
        for s, data, want in conns:
            s.sendall(data)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, [bytearray(), want])
        while len(answers) < n:
            for key, _ in sel.select(timeout=120):
                s = key.fileobj
                chunk = s.recv(1 << 16)  # type: ignore[union-attr]
                if not chunk:
                    raise AssertionError("the service closed a connection")
                buf = key.data[0]
                buf += chunk
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf[:] = rest
                    a = json.loads(line)
                    answers[a["id"]] = a
                    key.data[1] -= 1
                if key.data[1] == 0:  # all its answers: the service may close it now
                    sel.unregister(s)
        wall = time.perf_counter() - t0
        cpu1 = cpu_split()
        for s, _, _ in conns:
            s.close()
        statuses: dict[str, int] = {}
        for a in answers.values():
            st = (a["result"]["vms"][0]["status"] if a["ok"] and a["result"]["vms"]
                  else a.get("error", {}).get("code", "?"))
            statuses[st] = statuses.get(st, 0) + 1
            if st not in ("repaired", "ok") and "example" not in statuses:
                statuses["example"] = a
        return {"wall": wall, "statuses": statuses,
                "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0}}

    def run_cli() -> dict[str, Any]:
        t0 = time.perf_counter()
        r = subprocess.run([py, "-m", "nsmount", "reconnect", "--no-scan", "--json", "-q"],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rep = json.loads(r.stdout)
        return {"wall": wall, "rc": r.returncode, "lib": rep["seconds"],
                "statuses": {k: v for k, v in rep["summary"].items() if v and k != "total"}}

    def run_floor() -> dict[str, Any]:
        t0 = time.perf_counter()
        r = subprocess.run([floor, HP], input=vm_lines, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        res = json.loads(r.stdout)
        assert r.returncode == 0, r.stderr
        return {"wall": wall, "loop": res["loop_ns"] / 1e9, "failed": res["failed"]}

    def run_py_floor() -> dict[str, Any]:
        t0 = time.perf_counter()
        r = subprocess.run([py, str(Path(benchlib.BENCH_DIR) / "floor_reconnect.py"), HP],
                           input=vm_lines, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        return {"wall": wall, "loop": res["loop_ns"] / 1e9, "failed": res["failed"]}

    def run_checked() -> dict[str, Any]:
        t0 = time.perf_counter()
        r = subprocess.run([floor, "checked", HP, "/run/floor-locks"], input=vm_lines,
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        return {"wall": wall, "loop": res["loop_ns"] / 1e9, "failed": res["failed"]}

    variants = {"service": run_service, "service-noop": run_service, "cli": run_cli,
                "py-floor": run_py_floor}
    if floor:
        variants["floor"] = run_floor
        variants["checked-floor"] = run_checked
    order = list(variants)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for r in range(cfg["rounds"]):
        for name in order[r % len(order):] + order[:r % len(order)]:
            if name != "service-noop":  # every run before leaves every VM right
                reset()
            res = variants[name]()
            res["unverified"] = sum(not visible(i) for i in range(n))
            samples[name].append(res)
            settle()
            print(f"round {r + 1} {name}: {res}", file=sys.stderr, flush=True)

    def sampled_service_run() -> dict[str, Any]:
        """One more service run with py-spy sampling the service and its workers."""
        spy = subprocess.Popen([cfg["sample"], "record", "--subprocesses", "--idle",
                                "--rate", "1000", "--format", "raw", "-o", "/tmp/spy.txt",
                                "--pid", str(svc.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        reset()
        res = run_service()
        time.sleep(0.2)
        spy.send_signal(2)
        spy.wait()
        res["stacks"] = Path("/tmp/spy.txt").read_text()
        return res

    out: dict[str, Any] = {"n": n, "op": cfg["op"], "launch_s": t_launch, "samples": samples}
    if cfg.get("sample"):
        out["sampled"] = sampled_service_run()
    svc.terminate()
    svc.wait()
    if cfg["profile"]:
        svc = subprocess.Popen([py, "-c", PROFILED_SERVE], stderr=log)
        while not os.path.exists(sock_path):
            time.sleep(0.02)
        while talk({"op": "status"})["vms"] < n:
            time.sleep(0.1)
        settle()
        for f in os.listdir("/tmp/prof"):
            os.unlink(f"/tmp/prof/{f}")
        reset()
        prof = run_service()
        prof["unverified"] = sum(not visible(i) for i in range(n))
        out["profiled_service"] = prof
        svc.terminate()
        svc.wait()
        out["profile"] = merged_profile("/tmp/prof")
    out["service_log"] = Path("/tmp/serve.log").read_text().splitlines()[-200:]
    print(json.dumps(out))


#: ``nsmount serve`` with cProfile in the service loop and in every warm worker's
#: per-VM function (each worker dumps its stats to /tmp/prof/job-PID.prof after each VM)
PROFILED_SERVE = r"""
import cProfile, os, sys
from nsmount.faces.service import tasks
os.makedirs("/tmp/prof", exist_ok=True)
_vm = tasks.TASKS["vm"]
_prof = {}
def vm(item, ctx):
    p = _prof.setdefault(os.getpid(), cProfile.Profile())
    try:
        return p.runcall(_vm, item, ctx)
    finally:
        p.dump_stats(f"/tmp/prof/job-{os.getpid()}.prof")
tasks.TASKS["vm"] = vm
from nsmount.cli.main import main
prof = cProfile.Profile()
try:
    prof.runcall(main, ["serve"])
finally:
    prof.dump_stats("/tmp/prof/service.prof")
"""


def merged_profile(d: str) -> str:
    """The job children's merged stats (by tottime and by cumulative time, top 25) and
    the service loop's (top 15 by tottime)."""
    import io
    import os
    import pstats

    files = [os.path.join(d, f) for f in os.listdir(d)]
    jobs_ = [f for f in files if "/job-" in f]
    s = io.StringIO()
    s.write(f"--- the per-VM function in {len(jobs_)} worker(s), merged ---\n")
    st = pstats.Stats(stream=s)
    for f in jobs_:
        try:
            st.add(f)
        except (EOFError, ValueError, TypeError):  # a job killed mid-dump
            pass
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(25)
    for f in files:
        if f.endswith("service.prof"):
            s.write("--- the service loop ---\n")
            pstats.Stats(f, stream=s).sort_stats("tottime").print_stats(15)
            pstats.Stats(f, stream=s).sort_stats("cumulative").print_stats(45)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--op", choices=("reconnect", "repair"), default="reconnect")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--metrics", action="store_true",
                    help="the service writes a metrics file (--metrics-file)")
    ap.add_argument("--sample", action="store_true",
                    help="one more service run sampled by py-spy (if installed): "
                         "where the wall time goes, per function, unbiased")
    ap.add_argument("--json", default=str(RESULTS / "floor.json"))
    a = ap.parse_args()
    floor, why = compile_floor()
    # bytecode caches, as an installed nsmount has them (PYTHONDONTWRITEBYTECODE in the
    # environment would otherwise make every CLI run and job child compile its imports)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(BENCH_DIR.parent / "nsmount")],
                   check=True)
    print(header("floor", n=a.n, rounds=a.rounds, op=a.op))
    if floor is None:
        print(f"floor rows skipped: {why}")
    res, elapsed = run_sandbox_main("bench_floor", {"n": a.n, "rounds": a.rounds, "op": a.op,
                                                    "floor": floor, "reset_fallback": None,
                                                    "profile": a.profile, "metrics": a.metrics,
                                                    "sample": a.sample and shutil.which("py-spy")},
                                    hugetlbfs=[], timeout=1800)
    rows: dict[str, list[float]] = {}
    for name, runs in res["samples"].items():
        rows[name] = [r["wall"] for r in runs]
        if name == "floor":
            rows["floor-proc"] = rows.pop("floor")
            rows["floor"] = [r["loop"] for r in runs]
        if name in ("py-floor", "checked-floor"):
            rows[name] = [r["loop"] for r in runs]
        if name == "cli":
            rows["cli-library"] = [r["lib"] for r in runs]
    med = {k: statistics.median(v) for k, v in rows.items()}
    base = med.get("floor")
    print(f"N = {res['n']} VMs (launched in {res['launch_s']:.1f} s); service op "
          f"{res['op']!r}; {a.rounds} rounds, interleaved")
    checked_base = med.get("checked-floor")
    print(f"{'row':<13} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'x floor':>8} "
          f"{'x checked':>9}")
    for k in ("floor", "floor-proc", "py-floor", "checked-floor", "service", "service-noop",
              "cli", "cli-library"):
        if k in rows:
            ratio = f"{med[k] / base:8.1f}" if base else "       -"
            ratio2 = f"{med[k] / checked_base:9.1f}" if checked_base else "        -"
            print(f"{k:<13} {med[k] * 1000:10.1f} {min(rows[k]) * 1000:9.1f} "
                  f"{max(rows[k]) * 1000:9.1f} {ratio} {ratio2}")
    for r in res["samples"].get("service", []):
        if "cpu" in r:
            c = r["cpu"]
            print(f"service CPU ms in that run: loop {c['service'] * 1000:.0f}, workers "
                  f"{c['workers'] * 1000:.0f} (in the kernel "
                  f"{c.get('workers_system', 0) * 1000:.0f}); wall {r['wall'] * 1000:.0f}")
    for name, runs in res["samples"].items():
        bad = sum(r["unverified"] for r in runs)
        print(f"{name}: unverified VMs over all rounds: {bad}; last statuses: "
              f"{runs[-1].get('statuses', '-')}")
    if base:
        ok = med["service"] <= 10 * base
        print(f"target service <= 10x floor: {'met' if ok else 'MISSED'} "
              f"({med['service'] / base:.1f}x)")
    if res.get("profile"):
        print(res["profile"])
    write_result(a.json, "floor", {"params": vars(a), "elapsed": elapsed,
                                   "floor_skipped": why or None,
                                   "medians_s": med, **res})


if __name__ == "__main__":
    main()
