"""libvirt ``qemu`` hook front end and its installer.

libvirt runs ``/etc/libvirt/hooks/qemu`` (and, since 6.5, every executable in
``/etc/libvirt/hooks/qemu.d/``) as ``qemu DOMAIN OPERATION SUB-OP EXTRA`` with the
domain XML on stdin.  On ``reconnect`` (daemon restart) and ``started`` we repair
that one domain from the XML.  Rules for a hook: never call back into libvirt
(it would deadlock), never fail the operation because of us (a failing
``reconnect`` hook makes libvirt kill the VM), log what happened to stderr (libvirt
keeps it in the domain log).
"""

from __future__ import annotations

import os
import shlex
import sys

from ..errors import NsmountError
from ..model.display import escape_name

HOOK_OPS = {("reconnect", "begin"), ("started", "begin")}
MARKER = "# nsmount libvirt hook"


def run_hook(argv: list[str], stdin_text: str, *, lvdir: str | None = None) -> list[str]:
    """Repair the domain of a ``reconnect``/``started`` hook call; returns one message
    per VM (what happened, or why not).  Never raises: a hook must not break libvirt."""
    if len(argv) < 2:
        return []
    domain, op = argv[0], argv[1]
    sub = argv[2] if len(argv) > 2 else "-"
    if (op, sub) not in HOOK_OPS:
        return []
    who = escape_name(domain)
    try:
        from dataclasses import replace

        from ..state.libvirtspec import spec_from_domain_xml
        from ..state.sources import libvirt_state_dir, read_pidfile
        from . import audit
        from .reconnect import Candidate, reconnect
        from .service.client import hook_request

        # the resident service does it when it runs; else the same pipeline, here
        said = hook_request(domain, op, stdin_text)
        if said is not None:
            return [f"{op} {who}: {line}" for line in said]
        spec = spec_from_domain_xml(stdin_text) if stdin_text.strip() else None
        pid = read_pidfile(os.path.join(libvirt_state_dir(lvdir), f"{domain}.pid"))
        if spec is not None:
            spec = replace(spec, source="libvirt-hook")
        rep = reconnect(candidates=[Candidate(pid, "libvirt-hook", domain, spec=spec)])
        audit.log_outcomes(rep.outcomes, via=f"libvirt-hook {op}")
        msgs = []
        for o in rep.outcomes:
            msg = o.error if o.status == "failed" else f"{len(o.actions)} action(s)"
            msgs.append(f"{op} {who}: {o.status}: {msg}")
        return msgs
    except NsmountError as exc:
        return [f"{op} {who}: {exc.oneline()}"]
    except Exception as exc:  # a hook must never break libvirt
        return [f"{op} {who}: internal error: {exc!r}"]


def _pythonpath() -> str:
    """libvirt runs hooks with a bare environment: point Python at this nsmount."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return f"PYTHONPATH={shlex.quote(pkg_parent)}${{PYTHONPATH:+:$PYTHONPATH}}"


#: shell that filters the operation before Python starts: only these two start it.
#: The domain XML on stdin is left unread where nothing needs it (no ``cat``: one fork
#: and exec less per call): libvirt ignores the EPIPE of a hook that closes stdin
#: early ("child closed stdin early, ignoring EPIPE", libvirt's virCommandProcessIO)
_FILTER = """case "$2 $3" in
    "reconnect begin"|"started begin") ;;
    *) {other} ;;
esac
"""


def _run_nsmount(python: str | None, stdin: str = "") -> str:
    """Shell lines that run ``nsmount libvirt-hook`` and never fail the hook: a removed
    interpreter or package, a crash, all end in a note on stderr (the domain log)."""
    py = shlex.quote(python or sys.executable)
    return f"""if [ -x {py} ]; then
    {_pythonpath()} {py} -P -m nsmount libvirt-hook "$@"{stdin} ||
        echo "nsmount hook: $1 $2: nsmount failed ($?); the VM is left as it is" >&2
else
    {'cat >/dev/null; ' if not stdin else ''}echo "nsmount hook: {py} is gone;" \
        "$1 not repaired (nsmount uninstall-hook removes this hook)" >&2
fi
"""


#: a handled operation goes to the resident service when one runs (one ``socat``, no
#: Python start; the service reads libvirt's status XML itself): docs/protocol.rst
_VIA_SERVICE = """sock="${NSMOUNT_STATE_DIR:-/run/nsmount}/nsmount.sock"
case "$1" in
    ''|*[!A-Za-z0-9._+:@-]*) ;;
    *)
        if [ -S "$sock" ] && command -v socat >/dev/null 2>&1; then
            ans=$(printf '{"v":1,"op":"%s","domain":"%s","timeout":30,"id":"libvirt-hook"}\\n' \\
                      "$2" "$1" | socat -t 40 - "UNIX-CONNECT:$sock" 2>/dev/null)
            case "$ans" in
                *'"ok":true'*)
                    echo "nsmount: $2 $1: done by the service" >&2; exit 0 ;;
                '{'*)
                    printf 'nsmount: %s %s: %.500s\\n' "$2" "$1" "$ans" >&2; exit 0 ;;
            esac
        fi ;;
esac
"""


def hook_script(python: str | None = None) -> str:
    """``qemu.d/50-nsmount``: fails open in every case (``exit 0``); ignored operations
    cost the shell's ``case``, handled ones go to the service when it runs, else to
    ``nsmount libvirt-hook`` in a new Python."""
    return (f"#!/bin/sh\n{MARKER}: repairs a domain's mount namespace on reconnect/started\n"
            "# it never fails the libvirt operation: every path ends in exit 0\n"
            + _FILTER.format(other="exit 0")
            + _VIA_SERVICE + _run_nsmount(python) + "exit 0\n")


def _legacy_wrapper(chained: str, python: str | None = None) -> str:
    c = shlex.quote(chained)
    return (f"""#!/bin/sh
{MARKER} (chains the previous hook, kept at {chained})
# the chained hook's exit status is the hook's; nsmount's part never fails it
"""
            + _FILTER.format(other=f'if [ -x {c} ]; then exec {c} "$@"; fi; exit 0')
            + f"""tmp=$(mktemp) || {{ if [ -x {c} ]; then exec {c} "$@"; fi; exit 0; }}
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
rc=0
if [ -x {c} ]; then {c} "$@" < "$tmp"; rc=$?; fi
"""
            + _run_nsmount(python, stdin=' < "$tmp"') + "exit $rc\n")


def _paths(hooks_dir: str) -> tuple[str, str, str]:
    return (os.path.join(hooks_dir, "qemu.d", "50-nsmount"), os.path.join(hooks_dir, "qemu"),
            os.path.join(hooks_dir, "qemu.nsmount-chained"))


def _ours(path: str) -> bool:
    try:
        with open(path, errors="replace") as fh:
            return MARKER in fh.read(65536)
    except OSError:
        return False


def install(hooks_dir: str, *, legacy: bool = False, dry_run: bool = False) -> list[str]:
    """Install without clobbering: returns what was (or would be) done."""
    done: list[str] = []
    path, qemu, chained = _paths(hooks_dir)
    if not legacy:
        want = hook_script()
        if os.path.lexists(path):
            if not _ours(path):
                raise NsmountError(f"{path} exists and is not nsmount's; refusing to overwrite")
            with open(path) as fh:
                if fh.read() == want:
                    return [f"{path} already installed"]
        done.append(f"write {path}")
        if not dry_run:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            _write_exec(path, want)
        return done
    if os.path.lexists(qemu):
        if _ours(qemu):
            chain = os.path.lexists(chained)
            want = _legacy_wrapper(chained) if chain else hook_script()
            with open(qemu) as fh:
                if fh.read() == want:
                    return [f"{qemu} already chains nsmount"]
            done.append(f"write {qemu}" + (f" (runs {chained}, then nsmount)" if chain else ""))
            if not dry_run:
                _write_exec(qemu, want)
            return done
        if os.path.lexists(chained):
            raise NsmountError(f"{chained} exists; refusing to overwrite it")
        done += [f"move {qemu} to {chained}", f"write {qemu} (runs {chained}, then nsmount)"]
        if not dry_run:
            os.rename(qemu, chained)
            _write_exec(qemu, _legacy_wrapper(chained))
    else:
        done.append(f"write {qemu}")
        if not dry_run:
            os.makedirs(hooks_dir, mode=0o755, exist_ok=True)
            _write_exec(qemu, hook_script())
    return done


def uninstall(hooks_dir: str, *, legacy: bool = False, dry_run: bool = False) -> list[str]:
    """Remove exactly what :func:`install` put there; a chained legacy hook goes back to
    ``hooks/qemu``.  A file that is not nsmount's is never touched."""
    path, qemu, chained = _paths(hooks_dir)
    done: list[str] = []
    if not legacy:
        if not os.path.lexists(path):
            return [f"{path} not installed"]
        if not _ours(path):
            raise NsmountError(f"{path} is not nsmount's; refusing to remove it")
        done.append(f"remove {path}")
        if not dry_run:
            os.unlink(path)
        return done
    if not os.path.lexists(qemu):
        if os.path.lexists(chained):
            done.append(f"move {chained} back to {qemu}")
            if not dry_run:
                os.rename(chained, qemu)
            return done
        return [f"{qemu} not installed"]
    if not _ours(qemu):
        raise NsmountError(f"{qemu} is not nsmount's; refusing to remove it")
    if os.path.lexists(chained):
        done.append(f"move {chained} back to {qemu} (replacing nsmount's wrapper)")
        if not dry_run:
            os.rename(chained, qemu)
    else:
        done.append(f"remove {qemu}")
        if not dry_run:
            os.unlink(qemu)
    return done


def _write_exec(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
