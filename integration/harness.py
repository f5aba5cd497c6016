"""The pytest side of the integration scenarios (tests as code, issue 9).

A scenario is a plain function in a module under ``integration/scenarios/``; it runs
inside a fresh sandbox (tests/sandbox.py) as the fake hypervisor host, and either
asserts there (a failure is a traceback and a non-zero exit) or prints one JSON line
the test asserts on.  The test imports the function and hands it over::

    from harness import in_sandbox
    from scenarios.repair import damage_cycle

    in_sandbox(damage_cycle, hugetlbfs=["/dev/hugepages"])
    in_sandbox(crash_scenario, "repair", check=False).json()

Only a two-line import and the call (its arguments as Python literals) travel to the
sandbox; the code itself is imported there from this directory.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

INTEGRATION = Path(__file__).resolve().parent
for _p in (INTEGRATION, INTEGRATION.parent / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from sandbox import SandboxResult, privileged, run_in_sandbox  # noqa: E402

from nsmount.state.locks import flock_within  # noqa: E402

__all__ = ["assert_ok", "hugepages_held", "in_sandbox", "ok_json", "privileged",
           "scenario_code"]


def scenario_code(fn: Callable[..., object], *args: object) -> str:
    """The code that runs ``fn(*args)`` in a sandbox (args must be Python literals)."""
    for a in args:
        if ast.literal_eval(repr(a)) != a:
            raise TypeError(f"{a!r} does not survive repr(): not a literal")
    return (f"import sys\nsys.path.insert(0, {str(INTEGRATION)!r})\n"
            f"from {fn.__module__} import {fn.__name__}\n"
            f"{fn.__name__}({', '.join(map(repr, args))})\n")


def in_sandbox(fn: Callable[..., object], *args: object, hugetlbfs: Sequence[str] = (),
               timeout: float = 120, env: Mapping[str, str] | None = None,
               check: bool = True) -> SandboxResult:
    """Run the scenario ``fn(*args)`` in a fresh sandbox (see tests/sandbox.py)."""
    return run_in_sandbox(scenario_code(fn, *args), hugetlbfs=hugetlbfs, timeout=timeout,
                          env=env, check=check)


def assert_ok(res: SandboxResult) -> None:
    """The scenario ran to its end: its last line is ``OK``."""
    assert res.stdout.rstrip().endswith("OK"), res.describe()


def ok_json(fn: Callable[..., object], *args: object, **kw: Any) -> dict[str, Any]:
    """Run the scenario ``fn(*args)`` (see :func:`in_sandbox`); its JSON line must say
    ``"ok": true``.  Returns that line, with the run's description as ``_describe``."""
    res = in_sandbox(fn, *args, **kw)
    out: dict[str, Any] = res.json()
    assert out["ok"], res.describe()
    out["_describe"] = res.describe()
    return out


@contextlib.contextmanager
def hugepages_held(timeout: float = 600.0) -> Iterator[None]:
    """Held by every test that changes the machine-wide ``vm.nr_hugepages`` (the real
    QEMU hugepage test, the libvirt scenarios), for as long as it uses them: pytest-xdist
    runs tests side by side, and one of them setting the count back while another's
    guest maps its memory made that guest's mapping fail (ENOMEM).  An exclusive
    ``flock`` on a file in the temp dir, taken within ``timeout`` seconds or the test
    fails saying so."""
    path = os.path.join(tempfile.gettempdir(), "nsmount-tests-hugepages.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            flock_within(fd, timeout, interval=0.2)
        except TimeoutError:
            raise AssertionError(f"another test held {path} for {timeout:g}s") from None
        yield
    finally:
        os.close(fd)  # releases the lock
