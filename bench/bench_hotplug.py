#!/usr/bin/env python3
"""Benchmark: hotplug device nodes into a running VM, and repair a damaged one.

    python3 bench/bench_hotplug.py [--n 50] [--warmup 5] [--profile] [--json PATH]

Everything runs inside ``tests/sandbox.py``'s ``run_in_sandbox`` (a throwaway
mount+PID namespace playing a hypervisor host); the real host is never touched.  The
VM is a stand-in (``nsmount exec --spec F -- sleep 1000``: default nodes + /dev/loop0
+ a hugetlbfs at /dev/hugepages).  The hotplugged nodes are block nodes 7:N made in the
sandbox's /dev (/dev/loop1 for the single node, /dev/loop101..110 for the batch: nodes
only, no loop device is attached).  Measured side by side, interleaved round-robin:

  lib1       ``nsmount.faces.repair.device_add(pid, ["/dev/loop1"])`` in-process (pin, lock,
             enter, observe, mknod+chown+chmod, record update)
  cli1       ``python3 -m nsmount device add PID /dev/loop1``: start -> exit
  nsenter1   ``nsenter -t PID -m mknod -m MODE /dev/loop1 b 7 1``: start -> exit
  lib10      ``device_add`` of 10 nodes in one call
  nsenter10  10x ``nsenter -t PID -m mknod ...`` (one per node, as an admin would)
  repair_lib ``nsmount.faces.repair.repair(pid)`` in-process on a VM damaged with
             ``rm /dev/null; chmod 600 /dev/zero; umount /dev/shm; make-private /``
  repair_cli ``python3 -m nsmount repair PID`` on the same damage
  pyfloor    ``python3 -c pass``: interpreter start-up, the floor under the CLI

Between runs the nodes are removed again (untimed: ``device_remove`` for nsmount's,
``nsenter rm`` for the baseline's) and the damage is re-applied (untimed).  Every
method's result is checked once (node present in the VM with the host's rdev/mode).

Results: a table on stdout and JSON in bench/results/hotplug.json.  Targets: lib1
median <= 2 ms; nsenter10 / lib10 >= 5x.  When a target is missed the in-process calls
are profiled (cProfile) and the top functions printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RESULTS, header, run_sandbox_main, write_result
from benchlib import stats as sample_stats

HUGETLBFS = "/dev/hugepages"
SPEC_TOML = """\
name = "hotvm"
id = 8
devices = ["/dev/loop0"]
hugepages = true
"""
SPEC_FILE = "/run/nsmount-bench/spec.toml"  # sandbox-private /run
ONE = "/dev/loop1"
BATCH = [f"/dev/loop{n}" for n in range(101, 111)]
DAMAGE = "rm /dev/null; chmod 600 /dev/zero; umount /dev/shm; mount --make-private /"

TARGET_LIB1_MS = 2.0
TARGET_BATCH_RATIO = 5.0


# =================================================================== sandbox side
def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # repair exits 1 when it repaired
        raise RuntimeError(f"{argv[:6]}... exited {proc.returncode}: {proc.stderr.decode()}")
    return dt


def _start_vm() -> subprocess.Popen[bytes]:
    os.makedirs(os.path.dirname(SPEC_FILE), exist_ok=True)
    Path(SPEC_FILE).write_text(SPEC_TOML)
    p = subprocess.Popen([sys.executable, "-m", "nsmount", "exec", "--spec", SPEC_FILE, "--",
                          "sleep", "100000"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if (os.path.exists(f"/run/nsmount/vms/{p.pid}.json")
                    and Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep"):
                return p
        except FileNotFoundError:
            pass
        if p.poll() is not None:
            raise RuntimeError(f"VM exec failed: {p.returncode}")
        time.sleep(0.01)
    raise RuntimeError("VM did not start")


def _in_vm(pid: int, path: str) -> os.stat_result | None:
    try:
        return os.lstat(f"/proc/{pid}/root{path}")
    except FileNotFoundError:
        return None


def _nsenter_mknod(pid: int, path: str) -> list[str]:
    st = os.lstat(path)
    return ["nsenter", "-t", str(pid), "-m", "mknod", "-m", f"{st.st_mode & 0o7777:04o}",
            path, "b", str(os.major(st.st_rdev)), str(os.minor(st.st_rdev))]


def _check(pid: int, paths: list[str], what: str) -> None:
    for p in paths:
        st, host = _in_vm(pid, p), os.lstat(p)
        if st is None or (st.st_rdev, st.st_mode, st.st_uid, st.st_gid) != (
                host.st_rdev, host.st_mode, host.st_uid, host.st_gid):
            raise RuntimeError(f"{what}: {p} wrong in the VM: {st} vs host {host}")


def _profile(fn: Any, runs: int, reset: Any) -> dict[str, Any]:
    """cProfile ``fn`` ``runs`` times.  The per-VM work normally runs in a forked worker
    (nsmount.pipeline.workers); here it runs in this process so one profiler sees all."""
    import cProfile
    import importlib
    import io
    import pstats

    V = importlib.import_module("nsmount.pipeline.vm")
    orig = V.run_one
    main = cProfile.Profile()
    V.run_one = lambda f, timeout: f()
    try:
        for _ in range(runs):
            main.enable()
            fn()
            main.disable()
            reset()
    finally:
        V.run_one = orig
    out: dict[str, Any] = {"runs": runs}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        st = pstats.Stats(main, stream=buf)
        st.sort_stats(key).print_stats(20)
        out[key] = buf.getvalue().strip() + "\n"
    return out


def sandbox_main(cfg: dict[str, Any]) -> None:
    """Runs as the sandbox's payload; prints one JSON line with every sample."""
    import importlib

    R = importlib.import_module("nsmount.faces.repair")  # nsmount.faces.repair is also a function

    n, warmup = cfg["n"], cfg["warmup"]
    py = sys.executable
    for path in BATCH:
        if not os.path.exists(path):
            os.mknod(path, 0o660 | 0o060000, os.makedev(7, int(path[len("/dev/loop"):])))
    vm = _start_vm()
    pid = vm.pid
    spid = str(pid)

    def rm_lib(paths: list[str]) -> None:
        out = R.device_remove(pid, paths)
        if out.status == "failed":
            raise RuntimeError(f"device_remove: {out.error}")

    def rm_sh(paths: list[str]) -> None:
        subprocess.run(["nsenter", "-t", spid, "-m", "rm", "-f", *paths], check=True)

    def damage() -> None:
        subprocess.run(["nsenter", "-t", spid, "-m", "sh", "-c", DAMAGE], check=True)

    def lib(paths: list[str]) -> float:
        t0 = time.perf_counter()
        out = R.device_add(pid, paths)
        dt = time.perf_counter() - t0
        if out.status == "failed":
            raise RuntimeError(f"device_add: {out.error}")
        return dt

    def repair_lib() -> float:
        t0 = time.perf_counter()
        out = R.repair(pid)
        dt = time.perf_counter() - t0
        if out.status != "repaired":
            raise RuntimeError(f"repair: {out.status} {out.error}")
        return dt

    # validation: every method really creates the node(s) / repairs
    validation: dict[str, Any] = {}
    lib([ONE]); _check(pid, [ONE], "lib1"); rm_lib([ONE])  # noqa: E702
    _timed([py, "-m", "nsmount", "device", "add", spid, ONE]); _check(pid, [ONE], "cli1")  # noqa: E702
    rm_lib([ONE])
    _timed(_nsenter_mknod(pid, ONE)); _check(pid, [ONE], "nsenter1"); rm_sh([ONE])  # noqa: E702
    lib(BATCH); _check(pid, BATCH, "lib10"); rm_lib(BATCH)  # noqa: E702
    for p in BATCH:
        _timed(_nsenter_mknod(pid, p))
    _check(pid, BATCH, "nsenter10")
    rm_sh(BATCH)
    damage()
    out = R.repair(pid)
    validation["repair_actions"] = [a.describe() for a in out.actions]
    again = R.repair(pid)
    validation["repair_then_clean"] = out.status == "repaired" and again.status == "ok"
    if not validation["repair_then_clean"]:
        raise RuntimeError(f"repair validation: {out.status} then {again.status}")

    keys = ("lib1", "cli1", "nsenter1", "lib10", "nsenter10", "repair_lib", "repair_cli",
            "pyfloor")
    samples: dict[str, list[float]] = {k: [] for k in keys}

    def one_round(keep: bool) -> None:
        r: dict[str, float] = {}
        r["lib1"] = lib([ONE])
        rm_lib([ONE])
        r["cli1"] = _timed([py, "-m", "nsmount", "device", "add", spid, ONE])
        rm_lib([ONE])
        r["nsenter1"] = _timed(_nsenter_mknod(pid, ONE))
        rm_sh([ONE])
        r["lib10"] = lib(BATCH)
        rm_lib(BATCH)
        r["nsenter10"] = sum(_timed(_nsenter_mknod(pid, p)) for p in BATCH)
        rm_sh(BATCH)
        damage()
        r["repair_lib"] = repair_lib()
        damage()
        r["repair_cli"] = _timed([py, "-m", "nsmount", "repair", spid])
        r["pyfloor"] = _timed([py, "-c", "pass"])
        if keep:
            for k, v in r.items():
                samples[k].append(v * 1000.0)

    for _ in range(warmup):
        one_round(False)
    for _ in range(n):
        one_round(True)

    profile = None
    med = {k: statistics.median(v) for k, v in samples.items()}
    missed = med["lib1"] > TARGET_LIB1_MS or med["nsenter10"] / med["lib10"] < TARGET_BATCH_RATIO
    if cfg["profile"] or missed:
        profile = {
            "lib1": _profile(lambda: R.device_add(pid, [ONE]), cfg["profile_runs"],
                             lambda: rm_lib([ONE])),
            "lib10": _profile(lambda: R.device_add(pid, BATCH), cfg["profile_runs"],
                              lambda: rm_lib(BATCH)),
        }
    vm.kill()
    vm.wait()
    print(json.dumps({"samples": samples, "validation": validation, "profile": profile,
                      "python": py}))


# ====================================================================== host side
ROWS = [
    # key, label, target, compare-with
    ("lib1", "device_add 1 node, in-process", f"<={TARGET_LIB1_MS:g}", "nsenter1"),
    ("cli1", "device add 1 node, CLI", None, "nsenter1"),
    ("nsenter1", "nsenter mknod 1 node", None, None),
    ("lib10", "device_add 10 nodes, in-process", None, "nsenter10"),
    ("nsenter10", "10x nsenter mknod", None, None),
    ("repair_lib", "repair damaged VM, in-process", None, None),
    ("repair_cli", "repair damaged VM, CLI", None, None),
    ("pyfloor", "python3 -c pass (floor)", None, None),
]


def _table(stats: dict[str, dict[str, float]]) -> str:
    hdr = (f"{'measurement':34} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}"
           f" {'target':>10} {'base/this':>10}")
    out = [hdr, "-" * len(hdr)]
    for key, label, target, cmp in ROWS:
        s = stats[key]
        ratio = stats[cmp]["median"] / s["median"] if cmp else None
        tgt = ""
        if key == "lib1":
            tgt = f"{target} " + ("ok" if s["median"] <= TARGET_LIB1_MS else "MISS")
        elif key == "lib10" and ratio is not None:
            tgt = f">={TARGET_BATCH_RATIO:g}x " + ("ok" if ratio >= TARGET_BATCH_RATIO
                                                   else "MISS")
        rs = f"{ratio:.1f}x" if ratio is not None else ""
        out.append(f"{label:34} {s['median']:8.2f} {s['p90']:8.2f} {s['min']:8.2f}"
                   f" {s['max']:8.2f} {tgt:>10} {rs:>10}")
    out.append("(milliseconds; base/this = nsenter median / this median, >1 = nsmount faster)")
    return "\n".join(out)


def host_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="timed rounds (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    ap.add_argument("--profile", action="store_true",
                    help="always cProfile the in-process calls (default: only on a miss)")
    ap.add_argument("--profile-runs", type=int, default=200)
    ap.add_argument("--json", default=str(RESULTS / "hotplug.json"), help="output JSON path")
    args = ap.parse_args(argv)

    cfg = {"n": args.n, "warmup": args.warmup, "profile": args.profile,
           "profile_runs": args.profile_runs}
    timeout = 120 + (args.n + args.warmup) * 5 + args.profile_runs * 0.1
    data, elapsed = run_sandbox_main("bench_hotplug", cfg, hugetlbfs=[HUGETLBFS],
                                     timeout=timeout)
    stats = {k: sample_stats(v) for k, v in data["samples"].items()}
    ratios = {f"{cmp}/{key}": stats[cmp]["median"] / stats[key]["median"]
              for key, _, _, cmp in ROWS if cmp}

    print(header("hotplug", n=args.n, warmup=args.warmup))
    print(_table(stats))
    print(f"\nrepair plan: {data['validation']['repair_actions']}")
    if data["profile"]:
        for k, prof in data["profile"].items():
            print(f"\ncProfile of {k} ({prof['runs']} calls, by tottime):")
            print(prof["tottime"])

    write_result(args.json, "hotplug", {
        "n": args.n, "warmup": args.warmup,
        "targets": {"lib1_ms": TARGET_LIB1_MS, "nsenter10_over_lib10": TARGET_BATCH_RATIO},
        "met": {"lib1": stats["lib1"]["median"] <= TARGET_LIB1_MS,
                "batch_ratio": ratios["nsenter10/lib10"] >= TARGET_BATCH_RATIO},
        "stats_ms": stats, "ratios": ratios, "samples_ms": data["samples"],
        "validation": data["validation"], "profile": data["profile"],
        "sandbox_elapsed_s": elapsed,
    })
    return 0


if __name__ == "__main__":
    sys.exit(host_main())
