"""One VM, end to end: host facts -> enter -> observe -> plan -> apply -> report.

All namespace work for one VM happens in one worker thread: it enters the VM
(setns through the pidfd), observes and plans; if the plan needs host-side fds
(open_tree clones, peer-group handles) it steps back into the host namespace to
take them and re-enters the VM through the same pidfd to apply.  No fork, no
per-action process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .actions import (
    Action,
    FixNode,
    MakeDir,
    MakeNode,
    MakeSymlink,
    RelinkMount,
    RemoveEntry,
    ReplayMount,
)
from .errors import NoSuchProcessError, NsmountError
from .executor import Executor, RefusedError, Result, make_hugepage_dir, prepare_host
from .hoststate import HostState
from .kernel import consts as C
from .kernel import syscalls
from .model.spec import VmSpec
from .observe import dev_listing, observe, planted_symlinks
from .plan import Desired, Drift, diff, plan_rebuild
from .target import Target


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
        self.desired, self.skipped = host.desired(spec, pid=target.pid, cached=bulk,
                                                  all_hugetlbfs=all_hugetlbfs)
        self.host_devs = {h.path: dev for h in self.desired.mounts
                          if (dev := host.st_dev(h.path)) is not None}
        self.host_dev_fs = host.st_dev("/dev")

    # runs in a worker thread that already did unshare(CLONE_FS)
    def work(self, host_ns: int, *, dry_run: bool, rebuild: bool = False,
             nodes_only: bool = False, extra: list[Action] | None = None,
             inspect: bool = False,
             with_tree: bool = True) -> Outcome:
        t0 = time.perf_counter()
        out = Outcome(self.target.pid, self.spec.name, self.spec.source)
        out.warnings += [f"skipped {s.request.path}: {s.reason}" for s in self.skipped]
        try:
            syscalls.setns(self.target.pidfd, C.CLONE_NEWNS)
            obs = observe(self.desired, self.host_devs, with_tree=with_tree and not nodes_only)
            drifts, actions = diff(self.desired, obs)
            if nodes_only:  # hotplug: the spec holds just the new devices
                actions = [a for a in actions if isinstance(a, _NODE_ACTIONS)]
                drifts = [d for d in drifts if d.kind in _NODE_DRIFTS]
            if extra:
                actions = actions + list(extra)
            if rebuild:
                actions = plan_rebuild(self.desired) + [a for a in actions
                                                        if isinstance(a, RelinkMount)]
            refused: list[Action] = []
            try:
                shared_dev = os.stat("/dev").st_dev == self.host_dev_fs
            except OSError:
                shared_dev = False
            if shared_dev and not rebuild:
                # the VM sees the host's own /dev: a node change would land on the host
                refused = [a for a in actions if isinstance(a, (*_NODE_ACTIONS, RemoveEntry))]
                actions = [replace(a, make_mountpoint=False) if isinstance(a, ReplayMount)
                           else a for a in actions if a not in refused]
                out.warnings.append("the VM's /dev is the host's /dev (same filesystem): "
                                    "nsmount will not change it; use repair --rebuild-dev")
            elif obs.dev_fstype != "tmpfs" and not rebuild:
                out.warnings.append(f"the VM's /dev is not a private tmpfs ({obs.dev_fstype}): "
                                    "use repair --rebuild-dev to isolate it")
            if inspect:
                out.extra["mounts"] = [m.to_dict() for m in obs.tree]
                out.extra["dev"] = dev_listing()
                out.extra["dev_fstype"] = obs.dev_fstype
            listing = out.extra.get("dev") or ([] if self.bulk else dev_listing())
            for path, tgt in planted_symlinks(listing):
                out.warnings.append(f"symlink {path} -> {tgt} points outside /dev "
                                    "(not followed)")
            out.drifts, out.actions = drifts, actions
            if refused:
                out.status = "failed"
                out.error = ("refusing to change the host's /dev: "
                             + "; ".join(a.describe() for a in refused))
                out.error_code = 2
                if dry_run or not actions:
                    return out
            unfixable = [d for d in drifts if not d.fixable]
            if dry_run or not actions:
                out.status = "would-repair" if actions else "ok"
                if unfixable and not dry_run:
                    self._unfixed(out, unfixable)
                return out
            needs_host = any(isinstance(a, (ReplayMount, RelinkMount)) for a in actions)
            prep = None
            if needs_host:
                syscalls.setns(host_ns, C.CLONE_NEWNS)
                prep = prepare_host(actions)
                self.target.check_alive()
                syscalls.setns(self.target.pidfd, C.CLONE_NEWNS)
            ex = Executor(prep)
            try:
                out.results = ex.apply(actions)
            finally:
                ex.close()
                if prep:
                    prep.close()
            failed = [r for r in out.results if not r.ok]
            if refused:
                return out
            out.status = "failed" if failed else "repaired"
            if failed:
                out.error = "; ".join(f"{r.action.describe()}: {r.error}" for r in failed)
                out.error_code = 2
            if unfixable:
                self._unfixed(out, unfixable)
        except (OSError, NsmountError, RefusedError) as exc:
            out.status = "failed"
            if isinstance(exc, OSError) and exc.errno == 3:  # ESRCH
                exc = NoSuchProcessError(f"pid {self.target.pid} exited during the run")
            out.error = exc.oneline() if isinstance(exc, NsmountError) else (
                f"{exc.strerror or exc}" + (f" {exc.filename}" if getattr(exc, "filename", None)
                                            else "") if isinstance(exc, OSError) else str(exc))
            out.error_code = getattr(exc, "exit_code", 2)
            try:
                self.target.check_alive()
            except NoSuchProcessError as gone:
                out.error = gone.oneline()
                out.error_code = gone.exit_code
        finally:
            out.seconds = time.perf_counter() - t0
        return out

    @staticmethod
    def _unfixed(out: Outcome, unfixable: list[Drift]) -> None:
        out.status = "failed"
        msg = "not fixed: " + "; ".join(d.describe() for d in unfixable)
        out.error = f"{out.error}; {msg}" if out.error else msg
        out.error_code = 2


_NODE_ACTIONS = (MakeDir, MakeNode, FixNode, MakeSymlink)
_NODE_DRIFTS = {"missing-node", "missing-symlink", "missing-dir", "wrong-node", "wrong-symlink",
                "wrong-attrs", "planted", "unsafe-path"}


def host_ns_fd() -> int:
    return os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
