"""One VM's namespace work: observe -> plan -> apply, host side and VM side.

The VM's mount table is read from the host side; the VM is entered through the
namespace fd that was checked when the target was pinned (never the pidfd: a VM may
have unshared a namespace of its own since) only to look and to act.  Planning is
pure (:func:`nsmount.engine.plan.plan` decides everything, host-side steps included);
host-side steps and the host fds the VM-side steps need (open_tree clones, peer-group
handles) are done in the host namespace, then the VM is entered once more to apply.
"""

from __future__ import annotations

import os
import time

from ..engine.actions import Action, MakeHugepageDir, RelinkMount, ReplayMount
from ..engine.executor import Executor, Result, prepare_host
from ..engine.hoststate import HostState
from ..engine.observe import dev_listing, observe, observe_host, planted_symlinks
from ..engine.plan import plan
from ..errors import NsmountError, RefusedError
from ..kernel import consts as C
from ..kernel import syscalls
from ..model.display import escape_name
from ..model.namespace import Drift, Observed
from ..model.spec import VmSpec
from ..state.target import Target
from .outcome import Outcome, failure


class VmSession:
    """The work on one pinned, locked VM (see the module doc)."""

    def __init__(self, target: Target, spec: VmSpec, host: HostState, *,
                 all_hugetlbfs: bool = False, bulk: bool = False) -> None:
        self.target = target
        self.spec = spec
        self.host = host
        #: one of many VMs (reconnect): share host lookups, skip the /dev scan
        self.bulk = bulk
        self.desired, self.skipped = host.desired(spec, pid=target.pid, cached=bulk,
                                                  all_hugetlbfs=all_hugetlbfs,
                                                  dev_sb=target.recorded_dev)
        self.host_devs = {h.path: dev for h in self.desired.mounts
                          if (dev := host.st_dev(h.path)) is not None}
        #: st_dev of the /dev a rebuild swapped in (the VM's own from then on)
        self.new_dev: int | None = None

    def work(self, host_ns: int, *, dry_run: bool, mode: str = "repair",
             rebuild: bool = False, remove: tuple[str, ...] = ()) -> Outcome:
        """Observe, plan and (unless ``dry_run``) apply.  ``mode``: inspect, repair,
        add or remove (see :func:`nsmount.engine.plan.plan`).

        Runs in a process (or a thread) that owns its fs_struct and sits in the host
        namespace (``host_ns``), and is back there when this returns, whatever happened.
        """
        t0 = time.perf_counter()
        out = Outcome(self.target.pid, self.spec.name, self.spec.source)
        out.warnings += [f"skipped {s.request.path}: {s.reason}" for s in self.skipped]
        out.warnings += [f"refused: {r}" for r in self.spec.refused]  # named, never used
        try:
            # the namespace fd keeps a dead VM's namespace alive: never repair that one
            self.target.check_alive()
            obs, listing = self._observe(host_ns, mode)
            drifts, actions = plan(self.desired, obs, mode=mode, remove=remove,
                                   rebuild=rebuild)
            self._report(out, obs, listing, inspect=mode == "inspect")
            out.drifts, out.actions = drifts, actions
            unfixable = [d for d in drifts if not d.fixable]
            if dry_run or mode == "inspect" or not actions:
                out.status = "would-repair" if actions else "ok"
                if unfixable and not dry_run and mode != "inspect":
                    _unfixed(out, unfixable)
                return out
            out.results = self._apply(host_ns, actions, obs, rebuild)
            failed = [r for r in out.results if not r.ok]
            out.status = "failed" if failed else "repaired"
            if failed:
                out.error = "; ".join(f"{r.action.describe()}: {r.error}" for r in failed)
                out.error_code = 2
            if unfixable:
                _unfixed(out, unfixable)
        except (OSError, NsmountError, RefusedError) as exc:
            failure(out, exc, self.target)
        finally:
            out.seconds = time.perf_counter() - t0
        return out

    def _observe(self, host_ns: int, mode: str) -> tuple[Observed, list[dict[str, object]]]:
        hotplug = mode in ("add", "remove")
        tree = None if hotplug else self.target.mount_table()  # host side
        host_dirs = observe_host(self.desired)
        listing: list[dict[str, object]] = []
        syscalls.setns(self.target.nsfd, C.CLONE_NEWNS)
        try:
            obs = observe(self.desired, self.host_devs, tree=tree)
            if mode == "inspect" or not self.bulk:
                listing = dev_listing()
        finally:
            syscalls.setns(host_ns, C.CLONE_NEWNS)
        obs.host_hugepage_dirs = host_dirs
        return obs, listing

    def _apply(self, host_ns: int, actions: list[Action], obs: Observed,
               rebuild: bool) -> list[Result]:
        on_host = [a for a in actions if isinstance(a, MakeHugepageDir) and a.host]
        in_vm = [a for a in actions if a not in on_host]
        results: list[Result] = []
        if on_host:
            hx = Executor()  # rooted at the host's /
            try:
                results += hx.apply(on_host)
            finally:
                hx.close()
        if not in_vm:
            return results
        prep = None
        ex: Executor | None = None
        # everything after the host-side clones sits in the try: a worker serves many
        # VMs, so neither a clone's fd nor the VM's namespace may outlive a failure
        try:
            if any(isinstance(a, (ReplayMount, RelinkMount)) for a in in_vm):
                prep = prepare_host(in_vm)  # clones and handles, taken on the host
            self.target.check_alive()
            syscalls.setns(self.target.nsfd, C.CLONE_NEWNS)
            ex = Executor(prep, dev_sb=None if rebuild else obs.dev_id)
            results += ex.apply(in_vm)
            self.new_dev = ex.dev_sb if rebuild else None
        finally:
            try:
                if ex is not None:
                    ex.close()
                if prep:
                    prep.close()
            finally:
                syscalls.setns(host_ns, C.CLONE_NEWNS)
        return results

    def _report(self, out: Outcome, obs: Observed, listing: list[dict[str, object]], *,
                inspect: bool) -> None:
        if inspect:
            out.extra["mounts"] = [m.to_dict() for m in obs.tree]
            out.extra["hidden_mounts"] = [m.to_dict() for m in obs.hidden]
            out.extra["dev"] = listing
            out.extra["dev_fstype"] = obs.dev_fstype
        for path, tgt in planted_symlinks(listing):
            out.warnings.append(f"symlink {escape_name(path)} -> {escape_name(tgt)} "
                                "points outside /dev (not followed)")
        for m in obs.hidden:
            if m.propagation == "private" and any(v.mountpoint == m.mountpoint
                                                  for v in obs.tree):
                out.warnings.append(f"mount id {m.mount_id} at {escape_name(m.mountpoint)} "
                                    "is hidden under another mount: left alone")


def _unfixed(out: Outcome, unfixable: list[Drift]) -> None:
    out.status = "failed"
    msg = "not fixed: " + "; ".join(d.describe() for d in unfixable)
    out.error = f"{out.error}; {msg}" if out.error else msg
    out.error_code = 2


def host_ns_fd() -> int:
    return os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
