#!/usr/bin/env python3
"""Benchmark: time to build a VM's mount namespace + minimal /dev.

    python3 bench/bench_launch.py [--n 50] [--warmup 3] [--profile] [--extra-mounts K]
                                  [--json PATH]

Everything that unshares or mounts runs inside ``tests/sandbox.py``'s
``run_in_sandbox`` (a throwaway mount+PID namespace playing a hypervisor host, with
hugetlbfs at /dev/hugepages); the real host's mounts are never touched.

The VM is a typical one: the default nodes (null full zero random urandom ptmx kvm)
+ /dev/loop0..2 + a per-domain hugepage dir.  Measured side by side, interleaved
round-robin (one run of each method per iteration, so drift hits all alike):

  inproc    fork a child that runs ``launcher.prepare`` + ``launcher.build`` and
            ``os._exit(0)``; timed *inside* the child with perf_counter (prepare,
            build, and both), reported through a pipe.  Also the parent's wall time
            fork -> child reaped.
  rootless  the same in-process prepare + build by an unprivileged user (the forked
            child drops to uid/gid 65534 first): a user + mount namespace, host nodes
            bound onto empty files, new devpts, sealed (issue 12).  loop0..2 are made
            0666 in the sandbox so the user gets them; the hugetlbfs is not the user's,
            so no per-domain dir.
  launch    ``launcher.launch(spec, ["/bin/true"])`` from the parent: wall time until
            it returns (the child has exec'd).
  cli       ``python3 -m nsmount exec --spec F -- /bin/true``: subprocess start -> exit.
  pyfloor   ``python3 -c pass``: interpreter start-up, the floor under ``cli``.
  baseline  ``unshare -m --propagation slave sh -c SCRIPT`` doing the same work with
            shell tools (mount tmpfs, mknod/chown, mount --move the submounts,
            umount -l /dev, mount --move staging /dev, mkdir -p the hugepage dir),
            then ``exec /bin/true``: subprocess start -> exit.

Before timing, one validation pass runs a listing of /dev (nodes, modes, owners,
mounts) through both nsmount's CLI and the shell baseline and compares them, so the
baseline provably does the same work.

Results: a table on stdout and JSON in bench/results/launch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
name = "benchvm"
id = 7
devices = ["/dev/loop0", "/dev/loop1", "/dev/loop2"]
hugepages = true
"""
SPEC_FILE = "/run/nsmount-bench/spec.toml"      # sandbox-private /run
STAGING = "/run/nsmount-bench/dev-staging"       # baseline's staging mount point

TARGET_INPROC_MS = 10.0
TARGET_CLI_MS = 150.0

# what the validation pass lists inside each namespace
LISTING = r"""
cd /dev || exit 1
for f in * ; do stat -c '%n %F %t:%T %a %u:%g' "$f"; done
for d in /dev/hugepages/libvirt/qemu/*; do stat -c '%n %F %a %u:%g' "$d"; done
awk '$5 ~ "^/dev" {for (i = 7; i <= NF; i++) if ($i == "-") {print $5, $(i + 1); break}}' \
    /proc/self/mountinfo | sort
"""


# =================================================================== sandbox side
def _baseline_script(lp: Any, final: str) -> str:
    """The shell equivalent of the launch plan ``lp`` (nodes taken from the plan)."""
    from nsmount.engine.actions import MakeHugepageDir, MakeNode

    q = shlex.quote
    nodes = [a.entry for a in lp.actions if isinstance(a, MakeNode)]
    hps = [a for a in lp.actions if isinstance(a, MakeHugepageDir)]
    st = STAGING
    lines = ["set -e",
             f"mount -t tmpfs -o mode=755,size=65536,nosuid tmpfs {st}"]
    if lp.submounts:
        lines.append("mkdir " + " ".join(q(st + s[len('/dev'):]) for s in lp.submounts))
    owners: dict[str, list[str]] = {}
    for e in nodes:
        p = st + e.path[len("/dev"):]
        kind = "c" if e.kind == "chr" else "b"
        lines.append(f"mknod -m {e.mode:04o} {q(p)} {kind} {e.major} {e.minor}")
        owners.setdefault(f"{e.uid}:{e.gid}", []).append(q(p))
    for owner, paths in owners.items():
        lines.append(f"chown {owner} " + " ".join(paths))
    for s in lp.submounts:
        lines.append(f"mount --move {q(s)} {q(st + s[len('/dev'):])}")
    lines.append("umount -l /dev")
    lines.append(f"mount --move {st} /dev")
    for a in hps:
        lines.append(f"mkdir -p {q(a.path)}")
        lines.append(f"chmod 0700 {q(a.path)}")
        lines.append(f"chown {a.uid}:{a.gid} {q(a.path)}")
    lines.append(final)
    return "\n".join(lines) + "\n"


def _rm_hugepage_dirs(lp: Any) -> None:
    """Remove the per-domain hugepage dir so every run really creates it (untimed)."""
    from nsmount.engine.actions import MakeHugepageDir

    for a in lp.actions:
        if isinstance(a, MakeHugepageDir):
            try:
                os.rmdir(a.path)
            except FileNotFoundError:
                pass


def _inproc_child(w: int, spec: Any, prof_path: str | None) -> None:
    from nsmount.faces import launcher

    prof = None
    if prof_path:
        import cProfile

        prof = cProfile.Profile()
    code = 0
    try:
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        lp = launcher.prepare(spec)
        t1 = time.perf_counter()
        launcher.build(lp)
        t2 = time.perf_counter()
        if prof and prof_path:
            prof.disable()
            prof.dump_stats(prof_path)
        os.write(w, json.dumps([t1 - t0, t2 - t1, t2 - t0]).encode())
    except BaseException as exc:
        os.write(w, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        code = 1
    finally:
        os._exit(code)


ROOTLESS_UID = 65534


def _rootless_child(w: int, spec: Any) -> None:
    from nsmount.faces import launcher

    code = 0
    try:
        os.setgroups([])
        os.setresgid(ROOTLESS_UID, ROOTLESS_UID, ROOTLESS_UID)
        os.setresuid(ROOTLESS_UID, ROOTLESS_UID, ROOTLESS_UID)
        # dropping uid 0 in-process clears "dumpable" (/proc/self/* turn root's, so the
        # uid_map could not be written); a user's own process (exec'd) has it set
        import ctypes

        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        t0 = time.perf_counter()
        lp = launcher.prepare(spec, rootless=True)
        t1 = time.perf_counter()
        launcher.build(lp)
        t2 = time.perf_counter()
        if not os.path.exists("/dev/loop2") or not os.path.islink("/dev/ptmx"):
            raise RuntimeError(f"rootless /dev incomplete: {sorted(os.listdir('/dev'))}")
        os.write(w, json.dumps([t1 - t0, t2 - t1, t2 - t0]).encode())
    except BaseException as exc:
        os.write(w, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        code = 1
    finally:
        os._exit(code)


def run_inproc(spec: Any, prof_path: str | None = None,
               rootless: bool = False) -> tuple[list[float], float]:
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        if rootless:
            _rootless_child(w, spec)
        _inproc_child(w, spec, prof_path)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    res = json.loads(data)
    if isinstance(res, dict) or os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"in-process child failed: {res}")
    return res, wall


def run_launch(spec: Any) -> float:
    from nsmount.faces import launcher

    t0 = time.perf_counter()
    vm = launcher.launch(spec, ["/bin/true"])
    dt = time.perf_counter() - t0
    rc = vm.wait()
    vm.close()
    if rc != 0:
        raise RuntimeError(f"launch child exited {rc}")
    return dt


def run_cmd(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... exited {proc.returncode}: {proc.stderr.decode()}")
    return dt


def _validate(cli_prefix: list[str], unshare_prefix: list[str], lp: Any) -> dict[str, Any]:
    a = subprocess.run([*cli_prefix, "sh", "-c", LISTING], capture_output=True, text=True,
                       check=False)
    _rm_hugepage_dirs(lp)
    script = _baseline_script(lp, "exec sh -c " + shlex.quote(LISTING))
    b = subprocess.run([*unshare_prefix, script], capture_output=True, text=True, check=False)
    _rm_hugepage_dirs(lp)
    # devpts/mqueue/... options are identical (same mounts); tmpfs prints size=64k either way
    same = a.returncode == 0 and b.returncode == 0 and a.stdout == b.stdout
    out: dict[str, Any] = {"equivalent": same, "nsmount_listing": a.stdout.splitlines()}
    if not same:
        out.update(baseline_listing=b.stdout.splitlines(), nsmount_stderr=a.stderr,
                   baseline_stderr=b.stderr)
    return out


def _profile_summary(paths: list[str], top: int = 15) -> dict[str, Any]:
    import io
    import pstats

    out: dict[str, Any] = {"runs": len(paths)}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        st = pstats.Stats(*paths, stream=buf)
        st.sort_stats(key).print_stats(top)
        # drop pstats' per-file header lines
        out[key] = "\n".join(ln for ln in buf.getvalue().splitlines()
                             if not ln.rstrip().endswith(".prof")).strip() + "\n"
    return out


def sandbox_main(cfg: dict[str, Any]) -> None:
    """Runs as the sandbox's payload; prints one JSON line with every sample."""
    from nsmount.faces import launcher
    from nsmount.model.spec import VmSpec

    n, warmup = cfg["n"], cfg["warmup"]
    py = sys.executable
    os.makedirs(STAGING, exist_ok=True)
    # a busier host (container overlays...): K extra tmpfs mounts, sandbox-private /run
    for i in range(cfg.get("extra_mounts", 0)):
        mp = f"/run/nsmount-bench/extra/m{i}"
        os.makedirs(mp, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", mp], check=True)
    Path(SPEC_FILE).write_text(SPEC_TOML)
    for n in range(3):  # the rootless row's user may use the VM's disks
        os.chmod(f"/dev/loop{n}", 0o666)
    spec = VmSpec.from_text(SPEC_TOML)
    lp = launcher.prepare(spec)          # plan only (host side), for the baseline script
    launcher.prepare(spec, rootless=True)  # imports the rootless modules, as above for root
    import nsmount.kernel.userns  # noqa: F401  (imported at build time otherwise)
    unshare_prefix = ["unshare", "-m", "--propagation", "slave", "sh", "-c"]
    cli_prefix = [py, "-m", "nsmount", "exec", "--spec", SPEC_FILE, "--"]
    baseline_script = _baseline_script(lp, "exec /bin/true")

    validation = _validate(cli_prefix, unshare_prefix, lp)

    samples: dict[str, list[float]] = {k: [] for k in (
        "inproc_prepare", "inproc_build", "inproc_total", "inproc_wall",
        "rootless_prepare", "rootless_build", "rootless_total",
        "launch", "cli", "pyfloor", "baseline")}

    def one_round(keep: bool) -> None:
        (p, b, tot), wall = run_inproc(spec)
        _rm_hugepage_dirs(lp)
        (rp, rb, rt), _ = run_inproc(spec, rootless=True)
        la = run_launch(spec)
        _rm_hugepage_dirs(lp)
        cl = run_cmd([*cli_prefix, "/bin/true"])
        _rm_hugepage_dirs(lp)
        pf = run_cmd([py, "-c", "pass"])
        bl = run_cmd([*unshare_prefix, baseline_script])
        _rm_hugepage_dirs(lp)
        if keep:
            for k, v in (("inproc_prepare", p), ("inproc_build", b), ("inproc_total", tot),
                         ("inproc_wall", wall), ("rootless_prepare", rp),
                         ("rootless_build", rb), ("rootless_total", rt),
                         ("launch", la), ("cli", cl),
                         ("pyfloor", pf), ("baseline", bl)):
                samples[k].append(v * 1000.0)

    for _ in range(warmup):
        one_round(False)
    for _ in range(n):
        one_round(True)

    profile = None
    want_profile = cfg["profile"] or (
        statistics.median(samples["inproc_total"]) > TARGET_INPROC_MS)
    if want_profile:
        paths = []
        for i in range(cfg["profile_runs"]):
            path = f"/run/nsmount-bench/inproc-{i}.prof"
            run_inproc(spec, path)
            _rm_hugepage_dirs(lp)
            paths.append(path)
        profile = _profile_summary(paths)

    print(json.dumps({"samples": samples, "validation": validation,
                      "baseline_script": baseline_script, "profile": profile,
                      "python": py, "plan": [a.describe() for a in lp.actions]}))


# ====================================================================== host side
ROWS = [
    # key, label, target (ms) or None, compare with baseline?
    ("inproc_prepare", "in-process prepare()", None, False),
    ("inproc_build", "in-process build()", None, False),
    ("inproc_total", "in-process prepare+build", TARGET_INPROC_MS, True),
    ("inproc_wall", "in-process fork->reaped (wall)", None, True),
    ("rootless_prepare", "rootless prepare() (uid 65534)", None, False),
    ("rootless_build", "rootless build() (uid 65534)", None, False),
    ("rootless_total", "rootless prepare+build (uid 65534)", TARGET_INPROC_MS, True),
    ("launch", "launch() until exec'd", None, True),
    ("cli", "CLI exec start->exit", TARGET_CLI_MS, True),
    ("pyfloor", "python3 -c pass (floor)", None, False),
    ("baseline", "baseline unshare+sh start->exit", None, False),
]


def _table(stats: dict[str, dict[str, float]]) -> str:
    base = stats["baseline"]["median"]
    hdr = (f"{'measurement':34} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}"
           f" {'target':>8} {'base/this':>9}")
    out = [hdr, "-" * len(hdr)]
    for key, label, target, cmp in ROWS:
        s = stats[key]
        tgt = f"<={target:g}" if target else ""
        if target:
            tgt += " ok" if s["median"] <= target else " MISS"
        ratio = f"{base / s['median']:.2f}x" if cmp else ""
        out.append(f"{label:34} {s['median']:8.2f} {s['p90']:8.2f} {s['min']:8.2f}"
                   f" {s['max']:8.2f} {tgt:>8} {ratio:>9}")
    out.append("(milliseconds; base/this = baseline median / this median, >1 = nsmount faster)")
    return "\n".join(out)


def host_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="timed runs per method (default 50)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--profile", action="store_true",
                    help="always cProfile the in-process build (default: only if > 10 ms)")
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--extra-mounts", type=int, default=0, metavar="K",
                    help="mount K extra tmpfs in the sandbox host first (a busier host)")
    ap.add_argument("--json", default=str(RESULTS / "launch.json"), help="output JSON path")
    args = ap.parse_args(argv)

    cfg = {"n": args.n, "warmup": args.warmup, "profile": args.profile,
           "profile_runs": args.profile_runs, "extra_mounts": args.extra_mounts}
    timeout = 120 + args.n * 5 + args.profile_runs
    data, elapsed = run_sandbox_main("bench_launch", cfg, hugetlbfs=[HUGETLBFS],
                                     timeout=timeout)
    stats = {k: sample_stats(v) for k, v in data["samples"].items()}
    base = stats["baseline"]["median"]
    ratios = {k: base / stats[k]["median"] for k, _, _, cmp in ROWS if cmp}

    table = _table(stats)
    print(header("launch", n=args.n, warmup=args.warmup, extra_mounts=args.extra_mounts))
    print(table)
    v = data["validation"]
    print(f"\nbaseline produces the same /dev as nsmount: {v['equivalent']}")
    if not v["equivalent"]:
        print(json.dumps(v, indent=1))
    if data["profile"]:
        print(f"\ncProfile of prepare+build ({data['profile']['runs']} runs, by tottime):")
        print(data["profile"]["tottime"])

    write_result(args.json, "launch", {
        "n": args.n, "warmup": args.warmup, "extra_mounts": args.extra_mounts,
        "targets_ms": {"inproc_total": TARGET_INPROC_MS, "rootless_total": TARGET_INPROC_MS,
                       "cli": TARGET_CLI_MS},
        "stats_ms": stats, "ratios_baseline_over": ratios,
        "samples_ms": data["samples"], "validation": v,
        "baseline_script": data["baseline_script"], "plan": data["plan"],
        "profile": data["profile"], "sandbox_elapsed_s": elapsed,
    })
    return 0


if __name__ == "__main__":
    sys.exit(host_main())
