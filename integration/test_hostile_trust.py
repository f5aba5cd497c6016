"""Hostile VMs against nsmount's trust boundaries (issue 8), privileged and through an
unprivileged QEMU (uid 107) that ``unshare -Urm``-s its own user + mount namespace.

The scenario bodies live in ``integration/scenarios/trust.py`` (tests as code, issue 9):
each runs inside its own throwaway sandbox (tests/sandbox.py), starts its stand-in VMs with
``nsmount exec`` (so the launch record's pid and start time match), attacks from inside
the VM, runs nsmount and prints one JSON line.  This file asserts the contract:

======================  =====================================================  ==========
class                   safe outcome                                           exit
======================  =====================================================  ==========
foreign_mntns           mount ns owned by another user ns / not the one        15; 2
                        recorded at launch: inspect/repair/device/run-in
                        refuse ("user namespace"/"recorded"), nothing
                        changed; reconnect fails it, repairs the other VM
proc_fd_symlinks        /proc covered by a tmpfs of thread-self/fd/N ->        1 / 15
                        host file: host file untouched (mode, owner, xattrs),
                        VM node fixed (root VM) or VM refused (userns)
run_in_planted_binary   VM's /usr/local/bin/probe never runs; the host's       0 / 15
                        binary runs or a clear refusal
foreign_dev             /dev a bind of a host dir / revealed by umount -l:     2, then 1
                        drift foreign-dev (fixable false), nothing written;
                        --rebuild-dev swaps in a new tmpfs
fake_qemu_discovery     uid 1000 "qemu-system-x86_64" in its own user ns is    1/2
                        not adopted: its dir, mounts, hugepage dirs unchanged
mountinfo_fifo          FIFO at the VM's /proc/thread-self/mountinfo: no       0/1
                        hang (mount table read from the host side)
hung_vm_timeout         unanswered FUSE on /dev/shm: --timeout -> exit 16      16; 2
                        "timed out"; reconnect fails it in bounded time,
                        repairs the other VM, prints the summary
state_files             FIFO / -> /dev/zero / directory / UTF-16 / bad JSON /  0/1/2
                        name-content mismatch: that VM failed (or dropped),
                        other VM repaired, no hang, no traceback; the hook
                        returns 0 promptly
output_escaping         \\377 and \\012 escaped in text, no forged line, JSON ok  0/1
long_names_and_paths    by-id names of 242..255 bytes hot-added; a host mount  0; 1
                        path > PATH_MAX does not break repair/reconnect
stacked_mounts          two stacked private mounts of one host superblock:     1 then 0
                        repeated repairs converge, no EINVAL loop
======================  =====================================================  ==========

Every case also asserts ``problems == []``: nothing outside the VM's own /dev tmpfs and
the per-domain hugepage directories changed (fake /etc, the sandbox host's /dev and
mount table, watched directories), and ``pre``: the attack really took effect inside the
VM, so a failure is the product's, not the setup's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from harness import in_sandbox, privileged
from scenarios import trust

pytestmark = privileged


def scenario(fn: Callable[..., None], *args: object, hugetlbfs: tuple[str, ...] = (),
             timeout: float = 170) -> dict[str, Any]:
    """Run ``fn(*args)`` (a ``scenarios.trust`` case) in a fresh sandbox; its JSON,
    preconditions checked."""
    res = in_sandbox(fn, *args, hugetlbfs=hugetlbfs, check=False, timeout=timeout)
    assert res.returncode == 0, f"scenario crashed (test setup?):\n{res.describe()}"
    obs: dict[str, Any] = res.json()
    broken = [k for k, v in obs.get("pre", {}).items() if not v]
    assert not broken, f"SETUP: the attack did not take effect ({broken}): {obs}"
    return obs


def clean(r: dict[str, Any], *codes: int) -> None:
    """Finished in time, no traceback, exit code among ``codes`` (if given)."""
    where = f"nsmount {' '.join(r['args'])}: rc={r['rc']} ({r['seconds']}s)\n" \
            f"stdout: {r['out'][-2500:]}\nstderr: {r['err'][-1500:]}"
    assert not r["hung"], "HUNG " + where
    assert not r["traceback"], "TRACEBACK " + where
    if codes:
        assert r["rc"] in codes, where


def refused(r: dict[str, Any], code: int, *words: str) -> None:
    """Exit ``code`` with one 'nsmount: error:' line holding one of ``words``."""
    clean(r, code)
    err = r["err"].strip()
    assert err.startswith("nsmount: error:") and "\n" not in err, err
    assert any(w in err for w in words), f"none of {words} in {err!r}"


def by_pid(obs: dict[str, Any], pid: int) -> list[dict[str, Any]]:
    return [o for o in obs["vms"] if o["pid"] == pid]


def is_char(stat_line: str) -> bool:
    return stat_line.startswith("character special file")


USERNS_WORDS = ("user namespace", "recorded")


# ---------------------------------------------------------------------- 1
@pytest.mark.parametrize("variant", ["unpriv-userns", "priv-new-mntns"])
def test_foreign_mntns_refused(variant: str) -> None:
    o = scenario(trust.case_foreign_mntns, variant)
    for r in o["runs"].values():  # inspect, repair, device add, run-in
        refused(r, 15, *USERNS_WORDS)
    assert not o["runin_ran"], "run-in executed inside the foreign namespace"
    assert not o["evil_dev_changed"] and not o["evil_mounts_changed"], o
    clean(o["reconnect"], 2)
    good = by_pid(o, o["good_pid"])
    assert good and good[0]["status"] == "repaired", o["vms"]
    for e in by_pid(o, o["evil_pid"]):
        assert e["status"] == "failed" and any(w in e["error"] for w in USERNS_WORDS), e
    assert is_char(o["good_null"]), o["good_null"]
    assert o["problems"] == []


# ---------------------------------------------------------------------- 2
@pytest.mark.parametrize("variant", ["priv", "unpriv"])
def test_proc_fd_symlinks_do_not_redirect_attrs(variant: str) -> None:
    o = scenario(trust.case_proc_fd_symlinks, variant)
    assert o["victim_after"] == o["victim_before"], \
        f"HOST FILE CHANGED through the VM's /proc: {o['victim_before']} -> {o['victim_after']}"
    if variant == "priv":
        clean(o["repair"], 1)
        assert is_char(o["null_after"]) and o["null_after"].split(" ")[3] == "666", o
        assert o["loop0_after"].startswith("block special file"), o["loop0_after"]
    else:
        clean(o["reconnect"], 2)
        (vm,) = o["vms"]
        assert vm["status"] == "failed" and "user namespace" in vm["error"], vm
        refused(o["repair"], 15, *USERNS_WORDS)
    assert o["problems"] == []


# ---------------------------------------------------------------------- 3
@pytest.mark.parametrize("variant", ["priv", "unpriv"])
def test_run_in_never_runs_vm_planted_binary(variant: str) -> None:
    o = scenario(trust.case_run_in_planted_binary, variant)
    assert not o["planted_ran"], "HOST ROOT RAN THE VM'S PLANTED probe: " + str(o["run_in"])
    r = o["run_in"]
    if variant == "unpriv":
        refused(r, 15, *USERNS_WORDS)
    else:
        clean(r)
        if r["rc"] == 0:
            assert o["host_ran"], r
        else:
            assert r["err"].strip().startswith("nsmount: error:"), r
    assert o["problems"] == []


# ---------------------------------------------------------------------- 4
@pytest.mark.parametrize("variant", ["priv-bind", "priv-umount-l", "unpriv-bind"])
def test_foreign_dev_never_written(variant: str) -> None:
    o = scenario(trust.case_foreign_dev, variant)
    assert o["hostdir_after_repair"] == [], "repair wrote outside the VM's own /dev tmpfs"
    if variant == "unpriv-bind":
        refused(o["repair"], 15, *USERNS_WORDS)
    else:
        r = o["repair"]
        clean(r, 2)
        kinds = [(d["kind"], d.get("fixable")) for d in r["json"]["drift"]]
        assert ("foreign-dev", False) in kinds, kinds
        clean(o["rebuild"], 1)
        assert o["vm_dev_fstype"] == "tmpfs" and is_char(o["vm_null"]) and o["vm_mark_gone"], o
        clean(o["after_rebuild"], 0)
    assert o["problems"] == []


# ---------------------------------------------------------------------- 5
def test_fake_qemu_of_ordinary_user_not_adopted() -> None:
    o = scenario(trust.case_fake_qemu_discovery, hugetlbfs=("/dev/hugepages",))
    clean(o["reconnect"], 1, 2)
    good = by_pid(o, o["good_pid"])
    assert good and good[0]["status"] == "repaired", o["vms"]
    for f in by_pid(o, o["fake_pid"]):
        assert f["status"] == "failed", f"fake QEMU adopted: {f}"
    assert not o["fake_mounts_changed"], "mounts replayed into the user's namespace"
    assert o["host_hugepage_dirs"] == ["1-good"], o["host_hugepage_dirs"]
    assert o["problems"] == []


# ---------------------------------------------------------------------- 6
def test_mountinfo_fifo_does_not_hang() -> None:
    o = scenario(trust.case_mountinfo_fifo)
    clean(o["inspect"], 0)
    clean(o["repair"], 0, 1)
    rec = o["reconnect"]
    clean(rec, 1)
    assert re.search(r"^repaired\s+good \(pid", rec["out"], re.M), rec["out"]
    assert re.search(r"^\d+ VM\(s\): ", rec["out"], re.M), rec["out"]
    assert is_char(o["good_null"])
    assert o["problems"] == []


def test_hung_vm_times_out() -> None:
    o = scenario(trust.case_hung_vm_timeout)
    for r in o["runs"].values():
        refused(r, 16, "timed out")
        assert r["seconds"] < 20, r["seconds"]
    rec = o["reconnect"]
    clean(rec, 2)
    assert rec["seconds"] < 20, rec["seconds"]
    assert re.search(r"^failed\s+hung \(pid \d+\): .*timed out", rec["out"], re.M), rec["out"]
    assert re.search(r"^repaired\s+good \(pid", rec["out"], re.M), rec["out"]
    assert re.search(r"^2 VM\(s\): 0 ok, 1 repaired, 0 would repair, 1 failed", rec["out"],
                     re.M), rec["out"]
    assert is_char(o["good_null"])
    assert o["problems"] == []


# ---------------------------------------------------------------------- 7
STATE_VARIANTS = ["fifo-pidfile", "hook-fifo-pidfile", "fifo-record", "record-devzero",
                  "record-invalid-json", "record-pid-mismatch", "xml-dir", "xml-utf16"]


@pytest.mark.parametrize("variant", STATE_VARIANTS)
def test_hostile_state_files(variant: str) -> None:
    o = scenario(trust.case_state_files, variant)
    if variant == "hook-fifo-pidfile":
        clean(o["hook"], 0)
        assert o["hook"]["seconds"] < 10, o["hook"]
    rec = o["reconnect"]
    clean(rec, 0, 1, 2)
    assert rec["json"] is not None, rec["out"]
    good = by_pid(o, o["good_pid"])
    assert good and good[0]["status"] == "repaired", o["vms"]
    assert is_char(o["good_null"])
    failed = [v for v in o["vms"] if v["status"] == "failed"]
    if variant in ("fifo-pidfile", "hook-fifo-pidfile"):
        assert any(v["name"] == "bad" and v["error"] for v in failed), o["vms"]
    elif variant == "record-pid-mismatch":
        assert o["victim_dev_after"] == o["victim_dev_before"], \
            "a record whose name and content disagree was applied to another process"
        assert all(v["status"] == "failed" for v in by_pid(o, o["victim_pid"])), o["vms"]
    elif variant in ("xml-dir", "xml-utf16"):
        assert any((v["name"] == "bad" or v["pid"] == o["victim_pid"]) and v["error"]
                   for v in failed), o["vms"]
        assert rec["rc"] == 2
    else:
        assert any(v["pid"] == o["victim_pid"] and v["error"] for v in failed), o["vms"]
        assert rec["rc"] == 2
    assert o["problems"] == []


# ---------------------------------------------------------------------- 8
def test_output_escaping() -> None:
    o = scenario(trust.case_output_escaping)
    runs = o["runs"]
    for key in ("inspect", "repair"):
        r = runs[key]
        clean(r, 0 if key == "inspect" else 1)
        # the inspect tree may draw with UTF-8 box characters; a VM's bad bytes never pass
        assert not r["raw_bad_utf8"], f"raw non-UTF-8 bytes in {key} output"
        assert "\\377" in r["out"] and "\\012" in r["out"], r["out"]
        assert not any(ln.lstrip().startswith("FORGED-LINE") for ln in r["out"].splitlines()), \
            r["out"]
    clean(runs["inspect_json"], 0)
    assert runs["inspect_json"]["json"] is not None, runs["inspect_json"]["out"][-500:]
    paths = [str(e["path"]) for e in runs["inspect_json"]["json"]["dev"]]
    assert any(p.startswith("/dev/bad") and p.endswith("name") for p in paths), paths
    clean(runs["repair_json"], 1)
    assert runs["repair_json"]["json"] is not None
    assert is_char(o["null_after"])
    assert o["problems"] == []


# ---------------------------------------------------------------------- 9
@pytest.mark.parametrize("length", [242, 248, 255])
def test_long_byid_name_hot_added(length: int) -> None:
    o = scenario(trust.case_long_byid_name, length)
    clean(o["add"], 1)  # added: something changed
    assert o["vm_link"] == "../../loop1", o
    assert o["vm_loop1"].startswith("block special file"), o
    assert o["problems"] == []


def _only_long_path_failed(r: dict[str, Any], error: str) -> None:
    """Repaired, or failed only because of the over-long mount itself."""
    if r["rc"] == 2:
        assert "ddddd" in error or "too long" in error.lower(), error


@pytest.mark.parametrize("variant", ["dev-tmpfs", "hugetlbfs"])
def test_mount_path_beyond_path_max(variant: str) -> None:
    o = scenario(trust.case_path_max_mount, variant)
    clean(o["repair"], 1, 2)
    _only_long_path_failed(o["repair"], (o["repair"]["json"] or {}).get("error", ""))
    assert is_char(o["null_after_repair"]), \
        f"VM not repaired: {o['null_after_repair']!r}: {o['repair']['json'] or o['repair']['err']}"
    clean(o["reconnect"], 1, 2)
    (vm,) = o["vms"]
    _only_long_path_failed(o["reconnect"], vm["error"])
    assert is_char(o["null_after_reconnect"])
    assert len(o["hugepages_in_vm"]) == 1, o["hugepages_in_vm"]
    assert o["problems"] == []


# ---------------------------------------------------------------------- 10
@pytest.mark.parametrize("variant", ["proc", "data"])
def test_stacked_private_mounts_converge(variant: str) -> None:
    o = scenario(trust.case_stacked_mounts, variant)
    first, second, third = o["runs"]
    errors = [(r["json"] or {}).get("error") or r["err"] for r in o["runs"]]
    for r in o["runs"]:
        clean(r)
    assert not any("Invalid argument" in e for e in errors), errors
    assert first["rc"] in (0, 1) and second["rc"] == 0 and third["rc"] == 0, \
        ([r["rc"] for r in o["runs"]], errors)
    assert o["relinks"][0] <= 1, o["relinks"]
    assert "master:" in o["after"][-1], o["after"]
    assert o["problems"] == []
