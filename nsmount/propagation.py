"""Host propagation: are the mounts VMs depend on shared?  (``--fix`` = rshared.)

VM namespaces are slaves of the host: only mounts that are *shared* on the host
send their events to them.  systemd boots with ``/`` rshared; containers, and
units with ``MountFlags=slave``, do not.  This is the one command that changes
the host namespace, and only with ``--fix`` (``--dry-run`` shows it first).
"""

from __future__ import annotations

import argparse
import json

from .errors import from_oserror
from .hoststate import HostState
from .kernel import consts as C
from .kernel import syscalls
from .model.hostmounts import visible_top
from .model.paths import canonical


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


def cmd_propagation(args: argparse.Namespace) -> int:
    rows = check(args.mountpoints or None)
    bad = [r for r in rows if not r["ok"] and r["mounted"]]
    if args.fix and bad and not args.dry_run:
        for r in bad:
            try:
                syscalls.mount(None, str(r["path"]), None, C.MS_SHARED | C.MS_REC)
            except OSError as exc:
                raise from_oserror(exc, f"cannot make {r['path']} rshared") from None
        rows = check(args.mountpoints or None)
        bad = [r for r in rows if not r["ok"] and r["mounted"]]
    if args.json:
        print(json.dumps({"mounts": rows, "ok": not bad}, indent=1))
    else:
        for r in rows:
            state = r["propagation"] if r["mounted"] else "not mounted"
            flag = "ok " if r["ok"] else ("-- " if not r["mounted"] else "BAD")
            print(f"{flag} {r['path']:<30} {state}")
        if bad:
            verb = "would run" if args.dry_run else "fix with"
            print(f"{verb}: " + "; ".join(f"mount --make-rshared {r['path']}" for r in bad)
                  + ("" if args.fix else "  (or: nsmount propagation --fix)"))
    return 0 if not bad else 2 if args.fix and not args.dry_run else 1
