"""Device fds from the service (issue 12, items 2 and 4).

Each test runs in its own sandbox with the real ``nsmount serve`` and a device policy
granting uid 65534 ``/dev/loop*`` read-write; the clients are real unprivileged
processes (uid 65534, and 65533 as a second user the policy does not name).

=================  ====================================================================
test               checks
=================  ====================================================================
hostile            a bad policy at start-up: exit 3, one line; socket 0666 / dir 0711
                   while the policy grants something; a granted request gets a loop
                   device fd (never a path); refused: no pidfd, an fd that is not a
                   pidfd, two fds, 200 fds, the pidfd of root's
                   process, /dev/vda (the reason names the policy), outside /dev, '..';
                   a pidfd on ``list`` (unauthorized, fd closed); malformed, garbage and
                   oversized requests; a line trickled one byte + one fd per write
                   (500 fds: refused; mid-line the service holds at most one);
                   1000 requests on one connection; 50 clients that go before the
                   answer; 50 concurrent clients; a second user
                   with the first user's VM's pidfd (refused) and with its own (not in
                   the policy: refused); root's ``status`` with 1 fd attached
                   (answered, fd closed) and with 3 (refused); the service's open
                   fds equal before and after; a bad policy on SIGHUP is one line
                   naming file and line, the last good one is kept; no policy file:
                   socket 0600 and dir 0700 again; every decision logged; no
                   traceback
qemu_end_to_end    uid 65534's rootless QEMU (``nsmount exec``), the loop node 0600
                   root: ``nsmount device add --fd-to-qmp QMP pid:N /dev/loopX`` by
                   the user gets the fd from the service and ``blockdev-add`` of
                   ``/dev/fdset/N`` works; read-only with ``--json``; ``/dev/vda``:
                   exit 17, one line naming the policy; no service: exit 6 naming
                   it for the 0600 node, the user's own rights for a 0666 one
bind               ``device-bind`` (item 4) into uid 65534's rootless stand-in VM: the
                   loop node bound into its /dev (rw; a second time: present), a
                   read-only grant bound read-only; refused: a symlink the user put at
                   the target (never followed), /dev/vda (policy), a second user with
                   the first user's VM, a second user's own VM (policy), the user's
                   process in the host's namespace and one in a namespace that kept
                   the host's /dev; ``nsmount device add`` by the user (exit 1 bound,
                   0 present, 17 refused); the sandbox host's mounts and /dev
                   unchanged
=================  ====================================================================

The scenario bodies are in integration/scenarios/fdserve.py.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from harness import in_sandbox, privileged
from scenarios import fdserve

pytestmark = privileged


def test_hostile_clients() -> None:
    out: dict[str, Any] = in_sandbox(fdserve.hostile, timeout=120).json()
    rc, err = out["bad_at_start"]
    assert rc == 3 and "/tmp/policy.toml:1: rule 1: 'access'" in err, out["bad_at_start"]
    assert out["modes"] == ["0o666", "0o711"], out["modes"]
    a = out["attacks"]
    res, n = a["good"]
    assert n == 1 and res["major"] == 7 and res["node"] == "/dev/loop0", a["good"]
    for k in ("no_pidfd", "not_a_pidfd", "two_fds", "root_pidfd"):
        assert a[k][1] == 0 and a[k][0]["code"] in ("bad-pidfd", "bad-request"), (k, a[k])
    assert "none came" in a["no_pidfd"][0]["message"]
    assert "2 came" in a["two_fds"][0]["message"] or "more than 1" in a["two_fds"][0]["message"]
    assert "not a pidfd" in a["not_a_pidfd"][0]["message"]
    assert "belongs to uid 0" in a["root_pidfd"][0]["message"], a["root_pidfd"]
    assert a["many_fds"][0]["code"] == "bad-request" and a["many_fds"][1] == 0, a["many_fds"]
    assert a["vda"][0]["code"] == "denied" and "/tmp/policy.toml" in a["vda"][0]["message"]
    assert "nothing matching /dev/vda" in a["vda"][0]["message"], a["vda"]
    assert a["etc"][0]["code"] == "bad-request" and a["dotdot"][0]["code"] == "bad-request"
    assert a["list_with_pidfd"][0]["code"] == "unauthorized", a["list_with_pidfd"]
    assert a["malformed"][0]["code"] == "bad-request", a["malformed"]
    assert a["garbage"]["code"] in ("bad-request", "unauthorized"), a["garbage"]
    assert a["oversized"]["code"] == "too-large", a["oversized"]
    assert a["trickle"]["code"] == "bad-request" and "fd" in a["trickle"]["message"], a
    assert a["thousand"] == 1000
    assert a["concurrent"] == [7] * 50, a["concurrent"]
    other = out["other_user"]
    assert other[:2] == ["DeniedError", 17] and "belongs to uid 65534" in other[2], other
    own = out["other_user_own"]
    assert own[:2] == ["DeniedError", 17] and "nothing matching" in own[2], own
    assert out["root_status_with_fds"] == [True, "bad-request"], out["root_status_with_fds"]
    assert out["held_mid_line"] <= 2, out["held_mid_line"]
    assert out["held_answer"]["code"] == "bad-request", out["held_answer"]
    before, after = out["fds"]
    assert before == after, out["fds"]
    assert "/tmp/policy.toml:5: rule 2:" in out["bad_policy"], out["bad_policy"]
    assert "keeping the last good policy" in out["bad_policy"], out["bad_policy"]
    assert out["after_bad_policy"][:2] == [True, 7], out["after_bad_policy"]
    assert out["closed_modes"] == ["0o600", "0o700"], out["closed_modes"]
    assert out["alive"] and not out["traceback"]
    assert "uid=65534" in out["log_granted"] and "pid=" in out["log_granted"], out
    assert "policy" in out["log_refused"], out["log_refused"]


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 not installed")
def test_qemu_end_to_end() -> None:
    out: dict[str, Any] = in_sandbox(fdserve.qemu_end_to_end, timeout=120).json()
    assert out["vm_uid"] == 65534 and out["before"] is True, out
    rc, stdout, stderr = out["add"]
    assert rc == 0 and stdout.strip().startswith("/dev/fdset/"), out["add"]
    assert "fd from the nsmount service" in stderr, stderr
    assert out["blockdev"] == {"return": {}}, out["blockdev"]
    rc, err = out["vda"]
    assert rc == 17 and err.strip().startswith("nsmount: error:"), out["vda"]
    assert "/tmp/policy.toml" in err and "/dev/vda" in err and "\n" not in err.strip(), err
    rc, stdout, _ = out["ro"]
    assert rc == 0 and json.loads(stdout)["fds"][0]["read_only"] is True, out["ro"]
    rc, err = out["no_service"]
    assert rc == 6 and "no nsmount service" in err and "\n" not in err.strip(), out
    rc, stdout = out["no_service_own"]
    assert rc == 0 and stdout.startswith("/dev/fdset/"), out["no_service_own"]
    assert "d1" in out["nodes"] and out["status"] == "prelaunch", out
    assert out["vm_has_loop"] is False and not out["traceback"]


def test_device_bind() -> None:
    out: dict[str, Any] = in_sandbox(fdserve.bind, timeout=120).json()
    assert out["before"] is False
    assert out["rw"]["status"] == "bound" and out["rw"]["read_only"] is False, out["rw"]
    assert out["rw_again"]["status"] == "present", out["rw_again"]
    assert out["ro"]["status"] == "bound" and out["ro"]["read_only"] is True, out["ro"]
    assert out["loop0"] == [True, 7, 0], out
    assert out["mounts"]["/dev/loop0"][0].startswith("rw"), out["mounts"]
    assert out["mounts"]["/dev/loop1"][0].startswith("ro"), out["mounts"]
    for k, words in (("symlink", "already exists in the VM"), ("vda", "nothing matching"),
                     ("other_pid", "belongs to uid 65534"), ("other_own", "nothing matching"),
                     ("plain", "rootless VMs only"), ("keeps_host_dev", "the host mounts")):
        assert out[k][:2] == ["DeniedError", 17], (k, out[k])
        assert words in out[k][2], (k, out[k])
    rc, stdout, _ = out["cli"]
    assert rc == 1 and stdout.startswith("bound: /dev/loop4"), out["cli"]
    assert out["cli_again"][0] == 0 and "present" in out["cli_again"][1], out["cli_again"]
    rc, _, err = out["cli_vda"]
    assert rc == 17 and err.strip().startswith("nsmount: error:"), out["cli_vda"]
    assert "/tmp/policy.toml" in err and "\n" not in err.strip(), err
    assert out["unchanged"] and out["alive"] and not out["traceback"], out
    assert any("granted uid=65534" in ln for ln in out["log"]), out["log"]


def test_device_bind_never_propagates_to_the_host() -> None:
    out: dict[str, Any] = in_sandbox(fdserve.bind_never_propagates, timeout=60).json()
    assert out["bind_status"] == 0, out
    # the user could mount over its own copy, and the host's node is still /dev/null
    assert out["inner"] == "mounted", out
    assert out["host_is_chr"] and out["host_rdev"] == [1, 3], out


def test_a_client_that_never_reads_is_bounded() -> None:
    out: dict[str, Any] = in_sandbox(fdserve.flood_never_read, timeout=60).json()
    # it got stuck long before 64 MiB: the service stopped reading it
    assert out["sent"] < (16 << 20), out
    assert out["grew_kib"] < 16 << 10, out
    assert out["other"] and out["alive"], out
