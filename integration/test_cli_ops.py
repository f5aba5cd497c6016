"""The command line against a running stand-in VM, as monitoring and admins use it.

Each test runs in its own sandbox (tests/sandbox.py); the VM is ``nsmount exec --spec F
-- sleep 1000``; the scenario body is in integration/scenarios/cli_ops.py.

=====================  ===============================================================
test                   checks
=====================  ===============================================================
exit_codes_and_output  drift in the VM: ``repair --dry-run`` and ``reconnect --dry-run``
                       exit 1 and change nothing; ``inspect`` is a findmnt-like tree
                       (propagation column, then /dev), ``-o`` picks columns; ``inspect``
                       into a closed pipe five times: exit 0 (or SIGPIPE), empty
                       stderr; ``repair`` exits 1 and logs each change (VM, action,
                       before/after) on stderr, ``-q`` silences stdout and the log; a
                       clean ``repair`` exits 0; ``device remove`` of an absent node is
                       ``ok`` (0), ``device add`` exits 1; global options after the
                       command; JSON has ``version`` and kebab-case action names
=====================  ===============================================================
"""

from __future__ import annotations

from harness import assert_ok, in_sandbox, privileged
from scenarios import cli_ops

pytestmark = privileged


def test_exit_codes_and_output() -> None:
    assert_ok(in_sandbox(cli_ops.exit_codes_and_output))
