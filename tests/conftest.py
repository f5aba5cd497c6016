"""Session guard: the real host's mount table and /dev must never change.

The controller process (the only process without xdist, the xdist controller otherwise)
snapshots ``/proc/self/mountinfo`` and a listing of the real ``/dev`` (name, type, rdev,
mode, owner; not the contents of its submounts such as /dev/pts or /dev/shm) at session
start and compares at session end: any difference is printed and makes the run fail.
Every process (workers too) also compares around each test and tags the first test after
which the host changed, so the report can point at a culprit.

The guard is a plugin object registered once per run, so another conftest may re-export
``pytest_configure`` from here without doubling it.

Fixtures: ``sandbox`` (the ``run_in_sandbox`` function; skips when unavailable).
Tests marked ``privileged`` (or using ``sandbox``) are skipped without root/unshare; tests
marked ``qemu`` are skipped when qemu-system-x86_64 is not installed.
"""

from __future__ import annotations

import difflib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so `import sandbox` always works

from sandbox import run_in_sandbox, sandbox_unavailable_reason

GUARD_PLUGIN_NAME = "nsmount-host-guard"
_PROPERTY = "nsmount_host_changed"


def snapshot_mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return f.read().splitlines()


def snapshot_dev(root: str = "/dev") -> list[str]:
    """One line per entry of the real /dev tree, not descending into other mounts."""
    try:
        root_dev = os.lstat(root).st_dev
    except OSError as exc:
        return [f"{root}: {exc}"]
    lines: list[str] = []

    def walk(path: str) -> None:
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            lines.append(f"{path}: {exc}")
            return
        for name in names:
            full = os.path.join(path, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            kind = stat.filemode(st.st_mode)
            desc = f"{full} {kind} {st.st_uid}:{st.st_gid}"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                desc += f" {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            elif stat.S_ISLNK(st.st_mode):
                try:
                    desc += f" -> {os.readlink(full)}"
                except OSError:
                    pass
            if stat.S_ISDIR(st.st_mode) and st.st_dev != root_dev:
                desc += " [mount point]"  # pts, shm, mqueue, hugepages...: skip contents
                lines.append(desc)
                continue
            lines.append(desc)
            if stat.S_ISDIR(st.st_mode):
                walk(full)

    walk(root)
    return lines


def snapshot_rootfs_dev() -> list[str]:
    """The root filesystem's own /dev directory, hidden under the host's devtmpfs: a
    product bug once wrote nodes there (a VM that ran ``umount -l /dev``), where no
    listing of /dev can see them.  Looked at through a bind of / in a throwaway mount
    namespace (nothing changes on the host)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return []
    script = 'mount --bind / /mnt && ls -la --time-style=+ /mnt/dev | tail -n +2'
    try:
        proc = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"cannot look: {exc}"]
    return proc.stdout.splitlines() if proc.returncode == 0 else [f"cannot look: {proc.stderr}"]


def snapshot_host(*, deep: bool = False) -> dict[str, list[str]]:
    snap = {"/proc/self/mountinfo": snapshot_mountinfo(), "/dev listing": snapshot_dev()}
    if deep:
        snap["root filesystem's own /dev directory"] = snapshot_rootfs_dev()
    return snap


def diff_snapshots(before: dict[str, list[str]], after: dict[str, list[str]],
                   when: str = "session start") -> str:
    out: list[str] = []
    for key, old in before.items():
        if old != after.get(key):
            out.extend(difflib.unified_diff(old, after.get(key, []),
                                            f"{key} ({when})", f"{key} (now)",
                                            lineterm=""))
    return "\n".join(out)


class HostGuard:
    """Fails the session if the host's mount table or /dev changed."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.is_controller = not hasattr(config, "workerinput")
        self.start: dict[str, list[str]] | None = None
        self.culprits: list[tuple[str, str]] = []  # (nodeid, diff)

    # -- session level (controller only) -------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.is_controller:
            self.start = snapshot_host(deep=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if not self.is_controller or self.start is None:
            return
        diff = diff_snapshots(self.start, snapshot_host(deep=True))
        if not diff:
            return
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["THE REAL HOST'S MOUNT TABLE OR /dev CHANGED DURING THE TEST RUN", diff]
        for nodeid, _ in self.culprits[:5]:
            lines.append(f"first noticed after test: {nodeid}")
        text = "\n".join(lines)
        if tr is not None:
            tr.ensure_newline()
            tr.write_sep("!", "host changed", red=True, bold=True)
            tr.write_line(text)
        else:
            print(text, file=sys.stderr)
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED, 0, 5):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.is_controller or not self.culprits:
            return
        terminalreporter.write_sep("-", "host state changed while a test ran", yellow=True)
        for nodeid, diff in self.culprits[:5]:
            terminalreporter.write_line(f"{nodeid}:\n{diff}")

    # -- per test (every process) ---------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Any
                                ) -> Generator[None, object, object]:
        item.stash[_before_key] = snapshot_host()
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[Any]
                                  ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        before = item.stash.get(_before_key, None)
        if call.when == "teardown" and before is not None:
            diff = diff_snapshots(before, snapshot_host(), "before the test")
            if diff:
                report.user_properties.append((_PROPERTY, diff))
                report.sections.append(("host changed during this test", diff))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Runs in the controller for worker reports too (user_properties travel along).
        for name, value in report.user_properties:
            if name == _PROPERTY:
                self.culprits.append((report.nodeid, str(value)))


_before_key = pytest.StashKey[dict[str, list[str]]]()


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "privileged: needs root; runs inside a private sandbox namespace",
        "qemu: needs qemu-system-x86_64",
        "libvirt: needs the real libvirt daemon (slow)",
        "slow: takes more than a few seconds",
    ):
        config.addinivalue_line("markers", line)
    if not config.pluginmanager.has_plugin(GUARD_PLUGIN_NAME):
        config.pluginmanager.register(HostGuard(config), GUARD_PLUGIN_NAME)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = sandbox_unavailable_reason()
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    for item in items:
        if "sandbox" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.privileged)
        if reason is not None and item.get_closest_marker("privileged"):
            item.add_marker(pytest.mark.skip(reason=f"sandbox unavailable: {reason}"))
        if not have_qemu and item.get_closest_marker("qemu"):
            item.add_marker(pytest.mark.skip(reason="qemu-system-x86_64 not installed"))


@pytest.fixture
def sandbox() -> Callable[..., Any]:
    """The ``run_in_sandbox`` function (see tests/sandbox.py); skips without root."""
    reason = sandbox_unavailable_reason()
    if reason is not None:
        pytest.skip(f"sandbox unavailable: {reason}")
    return run_in_sandbox
