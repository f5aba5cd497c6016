"""Host propagation: are the mounts VMs depend on shared?  (``--fix`` = rshared.)

VM namespaces are slaves of the host: only mounts that are *shared* on the host
send their events to them.  systemd boots with ``/`` rshared; containers, and
units with ``MountFlags=slave``, do not.  This is the one command that changes
the host namespace, and only with ``--fix`` (``--dry-run`` shows it first).
"""

from __future__ import annotations

from ..errors import from_oserror
from ..engine.hoststate import HostState
from ..kernel import consts as C
from ..kernel import syscalls
from ..model.hostmounts import visible_top
from ..model.paths import canonical


def check(paths: list[str] | None = None) -> list[dict[str, object]]:
    host = HostState.read()
    wanted = [canonical(p) for p in paths] if paths else (
        ["/", "/dev"] + [h.path for h in host.hugetlbfs])
    out = []
    for p in wanted:
        m = visible_top(host.tree, p)
        if m is None:
            out.append({"path": p, "mounted": False, "propagation": None, "ok": False})
            continue
        out.append({"path": p, "mounted": True, "propagation": m.propagation,
                    "peer_group": m.shared, "ok": m.shared is not None})
    return out


def make_rshared(rows: list[dict[str, object]], *, dry_run: bool = False) -> list[str]:
    """``mount --make-rshared`` every mounted row that is not shared; returns the paths
    changed (or, with ``dry_run``, that would be).  The one change to the host namespace."""
    from . import audit

    done = []
    for r in rows:
        if r["ok"] or not r["mounted"]:
            continue
        path = str(r["path"])
        done.append(path)
        if dry_run:
            continue
        try:
            syscalls.mount(None, path, None, C.MS_SHARED | C.MS_REC)
        except OSError as exc:
            err = from_oserror(exc, f"cannot make {path} rshared")
            audit.log_host("make-rshared", path, before=str(r["propagation"]),
                           after="shared", result=f"failed: {err.oneline()}")
            raise err from None
        audit.log_host("make-rshared", path, before=str(r["propagation"]), after="shared")
    return done
