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

import argparse
import os
import shlex
import sys

from .errors import NsmountError

HOOK_OPS = {("reconnect", "begin"), ("started", "begin")}
MARKER = "# nsmount libvirt hook"


def run_hook(argv: list[str], stdin_text: str, *, lvdir: str | None = None) -> int:
    if len(argv) < 2:
        return 0
    domain, op = argv[0], argv[1]
    sub = argv[2] if len(argv) > 2 else "-"
    if (op, sub) not in HOOK_OPS:
        return 0
    from dataclasses import replace

    from .model.libvirt_xml import spec_from_domain_xml
    from .reconnect import Candidate, reconnect
    from .sources import libvirt_state_dir, read_pidfile

    try:
        from .model.display import safe_line
        from .service.client import hook_request

        # the service does it when it runs; else the same repair, in this process
        said = hook_request(domain, op, stdin_text)
        if said is not None:
            for line in said:
                print(safe_line(f"nsmount: {op} {domain}: {line}"), file=sys.stderr)
            return 0
        spec = spec_from_domain_xml(stdin_text) if stdin_text.strip() else None
        pid = read_pidfile(os.path.join(libvirt_state_dir(lvdir), f"{domain}.pid"))
        if spec is not None:
            spec = replace(spec, source="libvirt-hook")
        rep = reconnect(candidates=[Candidate(pid, "libvirt-hook", domain, spec=spec)])
        for o in rep.outcomes:
            msg = o.error if o.status == "failed" else f"{len(o.actions)} action(s)"
            print(f"nsmount: {op} {domain}: {o.status}: {msg}", file=sys.stderr)
    except NsmountError as exc:
        print(f"nsmount: {op} {domain}: {exc.oneline()}", file=sys.stderr)
    except Exception as exc:  # a hook must never break libvirt
        print(f"nsmount: {op} {domain}: internal error: {exc!r}", file=sys.stderr)
    return 0


def cmd_hook(args: argparse.Namespace) -> int:
    from .statefile import MAX_XML

    # libvirt writes the domain XML and closes stdin; a bigger one is not libvirt's
    text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read(MAX_XML + 1)
    if len(text) > MAX_XML:
        print(f"nsmount: domain XML on stdin is larger than {MAX_XML} bytes; ignored",
              file=sys.stderr)
        text = ""
    return run_hook(list(args.hook_args), text)


def _pythonpath() -> str:
    """libvirt runs hooks with a bare environment: point Python at this nsmount."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"PYTHONPATH={shlex.quote(pkg_parent)}${{PYTHONPATH:+:$PYTHONPATH}}"


def hook_script(python: str | None = None) -> str:
    py = shlex.quote(python or sys.executable)
    return (f"#!/bin/sh\n{MARKER}: repairs a domain's mount namespace on reconnect/started\n"
            f"{_pythonpath()} exec {py} -m nsmount libvirt-hook \"$@\"\n")


def _legacy_wrapper(chained: str, python: str | None = None) -> str:
    py = shlex.quote(python or sys.executable)
    c = shlex.quote(chained)
    return f"""#!/bin/sh
{MARKER} (chains the previous hook, kept at {chained})
tmp=$(mktemp) || exit 1
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
rc=0
if [ -x {c} ]; then {c} "$@" < "$tmp"; rc=$?; fi
{_pythonpath()} {py} -m nsmount libvirt-hook "$@" < "$tmp"
exit $rc
"""


def install(hooks_dir: str, *, legacy: bool = False, dry_run: bool = False) -> list[str]:
    """Install without clobbering: returns what was (or would be) done."""
    done: list[str] = []
    if not legacy:
        d = os.path.join(hooks_dir, "qemu.d")
        path = os.path.join(d, "50-nsmount")
        want = hook_script()
        if os.path.lexists(path):
            with open(path) as fh:
                have = fh.read()
            if MARKER not in have:
                raise NsmountError(f"{path} exists and is not nsmount's; refusing to overwrite")
            if have == want:
                return [f"{path} already installed"]
        done.append(f"write {path}")
        if not dry_run:
            os.makedirs(d, mode=0o755, exist_ok=True)
            _write_exec(path, want)
        return done
    path = os.path.join(hooks_dir, "qemu")
    if os.path.lexists(path):
        with open(path) as fh:
            have = fh.read()
        if MARKER in have:
            return [f"{path} already chains nsmount"]
        chained = os.path.join(hooks_dir, "qemu.nsmount-chained")
        if os.path.lexists(chained):
            raise NsmountError(f"{chained} exists; refusing to overwrite it")
        done += [f"move {path} to {chained}", f"write {path} (runs {chained}, then nsmount)"]
        if not dry_run:
            os.rename(path, chained)
            _write_exec(path, _legacy_wrapper(chained))
    else:
        done.append(f"write {path}")
        if not dry_run:
            os.makedirs(hooks_dir, mode=0o755, exist_ok=True)
            _write_exec(path, hook_script())
    return done


def _write_exec(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def cmd_install_hook(args: argparse.Namespace) -> int:
    for line in install(args.hooks_dir, legacy=args.legacy, dry_run=args.dry_run):
        print(("would " if args.dry_run else "") + line)
    if not args.legacy:
        print("note: libvirt >= 6.5 runs hooks in qemu.d/; restart libvirtd to pick it up")
    return 0
