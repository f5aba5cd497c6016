"""Face 1: build a VM's mount namespace and exec QEMU in it.

    >>> import nsmount
    >>> vm = nsmount.launch(spec, ["qemu-system-x86_64", ...])   # fork + build + exec
    >>> vm.pid, vm.pidfd

Not root: the same plan/apply core builds it in a user namespace of the caller's own
(:mod:`nsmount.faces.rootless`).

``exec_in_namespace`` does the same in the calling process (the CLI's ``nsmount
exec``), which must be single-threaded: ``unshare(CLONE_NEWNS)`` moves the whole
process.  The namespace is built from a plan (``prepare``), so ``--dry-run`` shows
exactly what would happen and nothing is changed before the plan is complete.
Everything happens in the new namespace: a failure leaves nothing on the host.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn

from ..engine.actions import Action
from ..errors import CommandNotFoundError, NsmountError, PrivilegeError, from_oserror
from ..engine.executor import Executor
from ..engine.hostfacts import Skipped
from ..engine.hoststate import HostState, effective_id, effective_name
from ..kernel import consts as C
from ..kernel import syscalls
from ..state import record
from ..model.spec import VmSpec
from ..engine.plan import plan_launch
from ..model.namespace import Desired


@dataclass
class LaunchPlan:
    spec: VmSpec
    desired: Desired
    actions: list[Action]
    skipped: list[Skipped]
    submounts: tuple[str, ...]
    #: built in a user namespace of the caller's own (faces/rootless.py)
    rootless: bool = False
    notes: list[str] = field(default_factory=list)


def is_rootless(rootless: bool | None = None) -> bool:
    """Rootless unless told otherwise when not root; root keeps the privileged build."""
    return os.geteuid() != 0 if rootless is None else rootless


def prepare(spec: VmSpec, *, pid: int | None = None, host: HostState | None = None,
            rootless: bool | None = None) -> LaunchPlan:
    """Read the host and plan the namespace (no changes, no root needed to plan).
    ``rootless`` (default: not root) plans the user-namespace build."""
    host = host or HostState.read()
    pid = os.getpid() if pid is None else pid
    if is_rootless(rootless):
        from . import rootless as R

        rp = R.plan(spec, pid=pid, host=host)
        return LaunchPlan(spec, rp.desired, rp.actions, rp.skipped, rp.submounts,
                          rootless=True, notes=rp.notes)
    desired, skipped = host.desired(spec, pid=pid)
    subs = tuple(h.path for h in host.submounts)
    return LaunchPlan(spec, desired, plan_launch(desired, subs), skipped, subs)


def build(lp: LaunchPlan) -> None:
    """unshare + slave + apply, in the calling (single-threaded) process."""
    if lp.rootless:
        from . import rootless as R

        R.build(lp.actions)
        return
    try:
        syscalls.unshare(C.CLONE_NEWNS)
        # host mount events keep arriving, nothing leaks back
        syscalls.mount(None, "/", None, C.MS_SLAVE | C.MS_REC)
    except OSError as exc:
        raise from_oserror(exc, "cannot create the mount namespace") from None
    ex = Executor(fail_fast=True, check_dev_mount=False)
    try:
        ex.apply(lp.actions)
    except OSError as exc:
        raise from_oserror(exc, "building /dev failed") from None
    finally:
        ex.close()


def _record(lp: LaunchPlan, pid: int, state_dir: str | None) -> None:
    """Written from inside the new namespace, right after it was built: the namespace
    and the /dev tmpfs identify the VM's own from now on (later runs refuse others)."""
    spec = replace(lp.spec, domain_id=effective_id(lp.spec, pid), name=effective_name(lp.spec))
    from ..state.target import starttime

    ns = os.stat("/proc/self/ns/mnt")
    dev = os.stat("/dev", follow_symlinks=False).st_dev
    userns = None
    if lp.rootless:
        from ..kernel.userns import userns_id

        userns = userns_id()
    record.write(record.Record(pid, starttime(pid), spec, lp.submounts,
                               (ns.st_dev, ns.st_ino), dev, userns), state_dir)


def _which(argv: Sequence[str]) -> str:
    if not argv:
        raise CommandNotFoundError("no command given")
    found = shutil.which(argv[0])
    if found is None:
        raise CommandNotFoundError(f"command not found: {argv[0]}")
    return found


def exec_in_namespace(spec: VmSpec, argv: Sequence[str], *, state_dir: str | None = None,
                      lp: LaunchPlan | None = None) -> NoReturn:
    """Build the namespace in this process and exec ``argv`` (never returns)."""
    exe = _which(argv)
    lp = lp or prepare(spec)
    build(lp)
    try:
        _record(lp, os.getpid(), state_dir)
    except OSError as exc:
        raise from_oserror(exc, "cannot write the launch record") from None
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(exe, list(argv))
    except OSError as exc:
        raise CommandNotFoundError(f"cannot exec {argv[0]}: {exc.strerror}") from None


@dataclass
class Launched:
    """A process started by :func:`launch` in its own namespace: like
    ``subprocess.Popen``, but addressed through a pidfd (a reused pid is never
    signalled).  As a context manager it waits for the process on exit and closes the
    pidfd; stop the VM first (``send_signal``) if it should not outlive the block."""

    pid: int
    pidfd: int
    plan: LaunchPlan
    returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code if the process ended (reaping it), else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end; its exit code (negative: killed by a signal).
        TimeoutError when ``timeout`` seconds pass first."""
        if self.returncode is None:
            if timeout is not None and self.pidfd >= 0:
                import select

                p = select.poll()  # not select(): fd numbers above 1024 are common
                p.register(self.pidfd, select.POLLIN)  # in a manager of many VMs
                if not p.poll(max(0, int(timeout * 1000) + 1)):
                    raise TimeoutError(f"pid {self.pid} still runs after {timeout}s")
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the process through its pidfd (nothing happens once it was reaped)."""
        import signal

        if self.returncode is None and self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self.close()


def launch(spec: VmSpec, argv: Sequence[str], *, state_dir: str | None = None,
           pass_fds: Sequence[int] = (), host: HostState | None = None,
           rootless: bool | None = None) -> Launched:
    """Fork, build the namespace in the child and exec ``argv`` there.

    Errors in the child before exec (a missing device, EPERM, ...) are sent back
    through a close-on-exec pipe and raised here as the same NsmountError, so a
    launcher sees failures synchronously, like ``subprocess`` does.
    """
    exe = _which(argv)
    # read the host once: the child plans again (its pid names the hugepage dir) from
    # the same snapshot, which the fork hands it for free
    host = host or HostState.read()
    rootless = is_rootless(rootless)
    lp = prepare(spec, pid=0, host=host, rootless=rootless)  # errors before forking
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child
        code = 127
        try:
            os.close(r)
            lp_child = prepare(spec, pid=os.getpid(), host=host, rootless=rootless)
            build(lp_child)
            _record(lp_child, os.getpid(), state_dir)
            for fd in pass_fds:
                os.set_inheritable(fd, True)
            os.execv(exe, list(argv))
        except BaseException as exc:  # report and die, never return into the caller
            err = exc if isinstance(exc, NsmountError) else NsmountError(
                f"{type(exc).__name__}: {exc}")
            try:
                os.write(w, pickle.dumps((type(err).__name__, str(err), err.exit_code)))
            except Exception:
                pass
            code = getattr(err, "exit_code", 127)
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    if data:
        os.waitpid(pid, 0)
        name, msg, code = pickle.loads(data)
        from .. import errors as E

        cls = getattr(E, name, E.NsmountError)
        raise cls(msg)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise NsmountError(f"launched process {pid} exited immediately") from None
        raise
    return Launched(pid, pidfd, lp)


def check_privileges(lp: LaunchPlan | None = None) -> None:
    if lp is not None and lp.rootless:
        return  # the user namespace gives the process what it needs
    if os.geteuid() != 0:
        raise PrivilegeError("building a mount namespace needs root")
