"""The installed libvirt hook script under faults (issue 10), no libvirt needed.

==================  ============================================================
case                what (every run: exit 0, one line on stderr, no traceback)
==================  ============================================================
faults              no service (the in-process repair; also with a malformed
                    domain XML; an ignored operation prints nothing); a stale
                    socket left by a service killed -9 (the Python fallback); the
                    service running (the shell path asks it, also with a
                    malformed XML; an unknown domain gets its error; without
                    socat the Python fallback asks it; the service log tells the
                    two apart by the request id); the package removed (the
                    service still does it; without it "nsmount failed"); the
                    interpreter removed ("is gone"; the service still does it)
==================  ============================================================

The scenario body is integration/scenarios/hook.py.
"""

from __future__ import annotations

from pathlib import Path

from harness import ok_json, privileged
from scenarios import hook

pytestmark = privileged


def test_hook_faults() -> None:
    ok_json(hook.faults, str(Path(__file__).resolve().parent.parent), timeout=120)
