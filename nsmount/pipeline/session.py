"""One VM, end to end: host facts -> enter -> observe -> plan -> apply -> report.

All namespace work for one VM happens in one thread of a worker that owns its
fs_struct: it reads the VM's mount table from the host side, enters the VM through
the namespace fd that was checked when the target was pinned (never the pidfd: a VM
may have unshared a namespace of its own since), observes, steps back to the host,
plans (pure), takes host-side fds (open_tree clones, peer-group handles) on the host
and re-enters only to apply.  No per-action process.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.actions import (
    Action,
    FixNode,
    MakeDir,
    MakeNode,
    MakeSymlink,
    RelinkMount,
    ReplayMount,
)
from ..errors import NoSuchProcessError, NsmountError, from_oserror
from ..engine.executor import Executor, RefusedError, Result, make_hugepage_dir, prepare_host
from ..engine.hoststate import HostState
from ..kernel import consts as C
from ..kernel import syscalls
from ..model.spec import VmSpec
from ..engine.observe import dev_listing, observe, planted_symlinks
from ..model.display import escape_name
from ..engine.plan import diff, foreign_dev, plan_rebuild
from ..model.namespace import Desired, Drift
from ..state.target import Target


@dataclass
class Outcome:
    """What happened to one VM."""

    pid: int
    name: str | None
    source: str
    status: str = "ok"  # ok | repaired | failed | would-repair
    drifts: list[Drift] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    error_code: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pid": self.pid, "name": self.name, "source": self.source, "status": self.status,
            "drift": [x.to_dict() for x in self.drifts],
            "actions": [a.to_dict() for a in self.actions],
            "results": [r.to_dict() for r in self.results],
            "warnings": self.warnings, "seconds": round(self.seconds, 6),
        }
        if self.error:
            d["error"] = self.error
        d.update(self.extra)
        return d


def ensure_host_hugepage_dirs(desired: Desired) -> list[str]:
    """Create the per-domain dirs on the host side (what libvirt's reconnect wants),
    symlink-proof from the host root; returns errors."""
    errs = []
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for mount, path in desired.hugepage_dirs:
            try:
                make_hugepage_dir(root, mount, path, desired.uid, desired.gid)
            except OSError as exc:
                errs.append(f"{path}: {exc.strerror}")
            except RefusedError as exc:
                errs.append(str(exc))
    finally:
        os.close(root)
    return errs


class VmSession:
    def __init__(self, target: Target, spec: VmSpec, host: HostState, *,
                 all_hugetlbfs: bool = False, bulk: bool = False) -> None:
        self.target = target
        self.spec = spec
        self.host = host
        #: one of many VMs (reconnect): share host lookups, skip the /dev scan
        self.bulk = bulk
        desired, self.skipped = host.desired(spec, pid=target.pid, cached=bulk,
                                             all_hugetlbfs=all_hugetlbfs)
        self.desired = replace(desired, dev_sb=target.recorded_dev)
        self.host_devs = {h.path: dev for h in self.desired.mounts
                          if (dev := host.st_dev(h.path)) is not None}

    def work(self, host_ns: int, *, dry_run: bool, rebuild: bool = False,
             nodes_only: bool = False, extra: list[Action] | None = None,
             inspect: bool = False, with_tree: bool = True) -> Outcome:
        """Observe, plan and (unless ``dry_run``) apply, for this one VM.

        Runs in a thread or process that owns its fs_struct and sits in the host
        namespace (``host_ns``); it enters the VM through the checked namespace fd
        (never the pidfd) only to look and to act, and is back in the host namespace
        when this returns, whatever happened.
        """
        t0 = time.perf_counter()
        out = Outcome(self.target.pid, self.spec.name, self.spec.source)
        out.warnings += [f"skipped {s.request.path}: {s.reason}" for s in self.skipped]
        try:
            # the namespace fd keeps a dead VM's namespace alive: never repair that one
            self.target.check_alive()
            tree = self.target.mount_table() if with_tree and not nodes_only else None
            listing: list[dict[str, object]] = []
            syscalls.setns(self.target.nsfd, C.CLONE_NEWNS)
            try:
                obs = observe(self.desired, self.host_devs, tree=tree)
                if inspect or not self.bulk:
                    listing = dev_listing()
            finally:
                syscalls.setns(host_ns, C.CLONE_NEWNS)
            drifts, actions = diff(self.desired, obs)
            if nodes_only:  # hotplug: the spec holds just the new devices
                actions = [a for a in actions if isinstance(a, _NODE_ACTIONS)]
                drifts = [d for d in drifts if d.kind in _NODE_DRIFTS]
            if extra:
                if foreign_dev(self.desired, obs):
                    drifts.append(Drift("foreign-dev", "/dev", foreign_dev(self.desired, obs)
                                        + ": nsmount removes nothing there", fixable=False))
                else:
                    actions = actions + list(extra)
            if rebuild:
                # plan as if /dev already were the fresh tmpfs the swap puts there: the
                # mounts the old one lacked are replayed into the new one afterwards
                fresh = replace(obs, dev_fstype="tmpfs", dev_id=0, dev_mount_root=True)
                drifts2, acts2 = diff(replace(self.desired, dev_sb=None,
                                              host_devs=frozenset()), fresh)
                actions = plan_rebuild(self.desired) + [
                    a for a in acts2 if isinstance(a, (RelinkMount, ReplayMount))]
                drifts = [replace(d, fixable=True) for d in drifts
                          if d.kind == "foreign-dev"] + [
                    d for d in drifts2 if d.kind in _MOUNT_DRIFTS]
            if inspect:
                out.extra["mounts"] = [m.to_dict() for m in obs.tree]
                out.extra["hidden_mounts"] = [m.to_dict() for m in obs.hidden]
                out.extra["dev"] = listing
                out.extra["dev_fstype"] = obs.dev_fstype
            for path, tgt in planted_symlinks(listing):
                out.warnings.append(f"symlink {escape_name(path)} -> {escape_name(tgt)} "
                                    "points outside /dev (not followed)")
            for m in obs.hidden:
                if m.propagation == "private" and any(
                        v.mountpoint == m.mountpoint for v in obs.tree):
                    out.warnings.append(f"mount id {m.mount_id} at "
                                        f"{escape_name(m.mountpoint)} is hidden under another "
                                        "mount: left alone")
            out.drifts, out.actions = drifts, actions
            unfixable = [d for d in drifts if not d.fixable]
            if dry_run or not actions:
                out.status = "would-repair" if actions else "ok"
                if unfixable and not dry_run:
                    self._unfixed(out, unfixable)
                return out
            prep = None
            if any(isinstance(a, (ReplayMount, RelinkMount)) for a in actions):
                prep = prepare_host(actions)  # clones and handles, taken on the host
            self.target.check_alive()
            syscalls.setns(self.target.nsfd, C.CLONE_NEWNS)
            ex = Executor(prep, dev_sb=None if rebuild else obs.dev_id)
            try:
                out.results = ex.apply(actions)
                if rebuild and ex.dev_sb is not None:
                    out.extra["new_dev"] = ex.dev_sb
            finally:
                ex.close()
                if prep:
                    prep.close()
                syscalls.setns(host_ns, C.CLONE_NEWNS)
            failed = [r for r in out.results if not r.ok]
            out.status = "failed" if failed else "repaired"
            if failed:
                out.error = "; ".join(f"{r.action.describe()}: {r.error}" for r in failed)
                out.error_code = 2
            if unfixable:
                self._unfixed(out, unfixable)
        except (OSError, NsmountError, RefusedError) as exc:
            failure(out, exc, self.target)
        finally:
            out.seconds = time.perf_counter() - t0
        return out

    @staticmethod
    def _unfixed(out: Outcome, unfixable: list[Drift]) -> None:
        out.status = "failed"
        msg = "not fixed: " + "; ".join(d.describe() for d in unfixable)
        out.error = f"{out.error}; {msg}" if out.error else msg
        out.error_code = 2


def failure(out: Outcome, exc: BaseException, target: Target | None = None) -> Outcome:
    """Turn an exception into this VM's failed outcome (the one place that does)."""
    out.status = "failed"
    if isinstance(exc, OSError) and exc.errno == errno.ESRCH:
        exc = NoSuchProcessError(f"pid {out.pid} exited during the run")
    if isinstance(exc, NsmountError):
        out.error, out.error_code = exc.oneline(), exc.exit_code
    elif isinstance(exc, OSError):
        err = from_oserror(exc, "system error")
        out.error, out.error_code = err.oneline(), 2
    else:
        out.error, out.error_code = str(exc), 2
    if target is not None:
        try:
            target.check_alive()
        except NoSuchProcessError as gone:
            out.error, out.error_code = gone.oneline(), gone.exit_code
    return out


_NODE_ACTIONS = (MakeDir, MakeNode, FixNode, MakeSymlink)
_MOUNT_DRIFTS = {"missing-mount", "hidden-mount", "private-mount", "foreign-mount",
                 "unobservable", "planted"}
_NODE_DRIFTS = {"missing-node", "missing-symlink", "missing-dir", "wrong-node", "wrong-symlink",
                "wrong-attrs", "planted", "unsafe-path"}


def host_ns_fd() -> int:
    return os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
