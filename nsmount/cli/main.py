"""The command-line front end: parse, call the library, print, map results to exit codes.

The only layer that parses arguments, prints (through :mod:`nsmount.cli.printers`) and
chooses exit codes; library modules return values.  Exit codes are in
:data:`EXIT_CODES` (README, man page): 0 clean, 1 repaired or (``--dry-run``) would
repair, 2 some repair failed, 3-14 one per :class:`~nsmount.errors.NsmountError` kind,
64 usage error, 66 an input file cannot be read, 130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .. import __version__
from . import printers as P
from ..errors import NsmountError, PrivilegeError, SpecError, from_oserror
from ..model.display import safe_line

log = logging.getLogger("nsmount")

EX_OK, EX_CHANGED, EX_FAILED = 0, 1, 2
EX_USAGE = 64  # sysexits.h EX_USAGE
EX_NOINPUT = 66  # sysexits.h EX_NOINPUT
EX_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

#: every exit code, for the README and the man page
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "ok, nothing to do"),
    (1, "repair, reconnect, device add/remove: something was repaired (with --dry-run: "
        "would be); propagation --check: a mount is not shared or not a mount point"),
    (2, "some repair failed (the report says which and why); other errors"),
    (3, "malformed spec, domain XML, status XML or command line"),
    (4, "unsafe path: outside /dev, '..', symlink loop, planted symlink"),
    (5, "a required device does not exist or is not a device"),
    (6, "not enough privilege (root / CAP_SYS_ADMIN needed)"),
    (7, "the command to exec does not exist"),
    (8, "target cannot be resolved (no libvirt state file, bad target syntax)"),
    (9, "target process does not exist or exited during the run"),
    (10, "target shares nsmount's own mount namespace (the host): refused"),
    (11, "nsmount has no record of the target and it is not QEMU: use --spec"),
    (12, "the kernel lacks a needed feature"),
    (13, "the VM is locked by another nsmount for too long"),
    (14, "a system call failed (the message names it)"),
    (15, "the target's mount namespace is owned by another user namespace, or is not the "
         "one recorded at launch: refused"),
    (16, "the work on a VM passed its deadline (--timeout) and was abandoned"),
    (17, "the service refused a device fd or bind: its policy does not grant the device to "
         "this user, or the target is not this user's own VM"),
    (64, "usage error: unknown command or option, a flag the command cannot honour, "
         "a bad value"),
    (66, "an input file (--spec, --domain-xml) cannot be read"),
    (130, "interrupted (Ctrl-C)"),
)


class UsageError(Exception):
    """A command line nsmount will not run: one line on stderr, exit 64."""


class InputError(NsmountError):
    """A file named on the command line cannot be read."""

    exit_code = EX_NOINPUT


# ---------------------------------------------------------------- parser
class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 64) and "did you mean" suggestions."""

    all_options: set[str] = set()

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            near = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else \
                f" (one of: {', '.join(choices)})"
            what = "command" if message.startswith(("argument COMMAND", "argument add|")) \
                else "value"
            message = f"unknown {what} '{m.group(1)}'{hint}"
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            for word in m.group(1).split():
                if word.startswith("-"):
                    near = difflib.get_close_matches(word.split("=")[0],
                                                     sorted(Parser.all_options), n=1)
                    if near:
                        message += f" (did you mean '{near[0]}'?)"
                        break
        sub = self.prog.partition(" ")[2]
        raise UsageError(f"{sub}: {message}" if sub else message)


def _positive_int(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= n <= 4096:
        raise argparse.ArgumentTypeError(f"must be between 1 and 4096, not {n}")
    return n


def _seconds(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < val <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds, "
                                         f"not {text}")
    return val


def _columns(text: str) -> list[str]:
    cols = [c.strip().upper() for c in text.split(",") if c.strip()]
    bad = [c for c in cols if c not in P.MOUNT_COLUMNS]
    if bad or not cols:
        raise argparse.ArgumentTypeError(
            f"unknown column {bad[0] if bad else text!r} (columns: "
            f"{','.join(P.MOUNT_COLUMNS)})")
    return cols


def _global_opts(p: argparse.ArgumentParser, *, sub: bool) -> None:
    """The options every command takes, before or after the command's name (after it,
    they are SUPPRESSed by default so they do not overwrite a value given before)."""
    def d(value: object) -> object:
        return argparse.SUPPRESS if sub else value

    g = p.add_argument_group("global options")
    g.add_argument("-v", "--verbose", action="count", default=d(0),
                   help="more log output (-vv: debug)")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="no report on stdout, only errors on stderr")
    g.add_argument("--state-dir", metavar="DIR", default=d(None),
                   help="nsmount state dir (default $NSMOUNT_STATE_DIR or /run/nsmount)")
    g.add_argument("--libvirt-state-dir", metavar="DIR", default=d(None),
                   help="libvirt's QEMU state dir (default $NSMOUNT_LIBVIRT_STATE_DIR or "
                   "/run/libvirt/qemu)")
    g.add_argument("--libvirt-config", metavar="FILE", default=d(None),
                   help="libvirt's qemu.conf: cgroup_device_acl, hugetlbfs_mount, user/group "
                   "(default $NSMOUNT_LIBVIRT_CONFIG or /etc/libvirt/qemu.conf)")


def build_parser() -> Parser:
    p = Parser(prog="nsmount",
               description="Mount-namespace and mount-propagation manager for QEMU VMs.",
               epilog="Exit codes: 0 clean, 1 repaired (or would repair), 2 repair failed, "
               "64 usage error; see nsmount(8).")
    p.add_argument("--version", action="version", version=f"nsmount {__version__}")
    _global_opts(p, sub=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=Parser)

    def add(name: str, help: str, func: Callable[..., int], parent: Any = sub,
            **kw: Any) -> Parser:
        sp: Parser = parent.add_parser(name, help=help, description=help[:1].upper()
                                       + help[1:] + ".", **kw)
        _global_opts(sp, sub=True)
        sp.set_defaults(func=func)
        return sp

    def spec_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--domain-xml", metavar="FILE", help="libvirt domain XML ('-' = stdin)")
        g.add_argument("--spec", metavar="FILE", help="TOML/JSON VM spec ('-' = stdin)")

    def timeout_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                        help="deadline for the work on one VM, lock wait included; a VM "
                        "that blocks longer is abandoned (default 30)")

    def target_opts(sp: argparse.ArgumentParser, *, json: bool = True) -> None:
        sp.add_argument("target", metavar="TARGET", help="PID, pid:N or a libvirt domain name")
        spec_opts(sp)
        if json:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        timeout_opt(sp)

    sp = add("exec", "build a VM namespace and exec a command in it", cmd_exec)
    spec_opts(sp)
    sp.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    sp.add_argument("--json", action="store_true", help="the plan as JSON (with --dry-run)")
    sp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                    help="the command to exec (e.g. qemu-system-x86_64 ...)")

    sp = add("demo", "build, break and repair a demo VM in a private sandbox", cmd_demo)
    sp.add_argument("--no-qemu", action="store_true", help="use a stand-in process, not QEMU")

    sp = add("inspect", "show a VM namespace's mount tree, /dev and drift", cmd_inspect)
    target_opts(sp)
    sp.add_argument("-o", "--output", type=_columns, metavar="LIST",
                    help="mount tree columns, comma-separated: " + ",".join(P.MOUNT_COLUMNS)
                    + " (default " + ",".join(P.DEFAULT_MOUNT_COLUMNS) + ")")

    sp = add("repair", "fix a running VM's namespace (exit 0 clean, 1 repaired)", cmd_repair)
    target_opts(sp)
    sp.add_argument("--dry-run", action="store_true", help="show the plan (exit 1 if any)")
    sp.add_argument("--rebuild-dev", action="store_true",
                    help="build a fresh minimal /dev and swap it in atomically")

    sp = add("device", "hotplug device nodes into a running VM", cmd_missing_sub)
    dsub = sp.add_subparsers(dest="device_cmd", required=True, metavar="add|remove",
                             parser_class=Parser)
    for name, what in (("add", "create device nodes (and their symlinks) inside a VM"),
                       ("remove", "remove device nodes from inside a VM")):
        dp = add(name, what, cmd_device, parent=dsub)
        target_opts(dp)
        dp.add_argument("paths", nargs="+", metavar="PATH", help="device path under /dev")
        dp.add_argument("--dry-run", action="store_true", help="show the plan (exit 1 if any)")
        if name == "add":
            dp.add_argument("--fd-to-qmp", metavar="QMP_SOCKET",
                            help="instead of making nodes, open each device and give it to "
                            "the VM's QEMU over this QMP socket (add-fd); prints the "
                            "/dev/fdset/N path for blockdev-add")
            dp.add_argument("--read-only", action="store_true",
                            help="with --fd-to-qmp: open the devices read-only; as a "
                            "non-root user (the service binds into the user's rootless "
                            "VM): bind them read-only")

    sp = add("run-in", "run a command inside a VM's mount namespace", cmd_run_in)
    sp.add_argument("target", metavar="TARGET", help="PID, pid:N or a libvirt domain name")
    sp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    sp = add("propagation", "check or fix host mount propagation (rshared)", cmd_propagation)
    grp = sp.add_mutually_exclusive_group()
    grp.add_argument("--check", action="store_true", help="report only (default)")
    grp.add_argument("--fix", action="store_true", help="make the mounts rshared")
    sp.add_argument("--dry-run", action="store_true", help="with --fix: show, change nothing")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("mountpoints", nargs="*", metavar="MOUNTPOINT",
                    help="default: /, /dev and every hugetlbfs mount")

    sp = add("reconnect", "repair every running VM (or one) after a daemon restart",
             cmd_reconnect)
    sp.add_argument("target", nargs="?", metavar="TARGET", help="only this VM")
    sp.add_argument("--dry-run", action="store_true", help="show the plans (exit 1 if any)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--jobs", type=_positive_int, metavar="N",
                    help="worker processes (default: one per CPU)")
    sp.add_argument("--no-scan", action="store_true", help="skip the process-table scan")
    timeout_opt(sp)

    sp = add("spec", "show what nsmount derives for a VM and why (pure: no root, changes "
             "nothing)", cmd_spec)
    sp.add_argument("target", nargs="?", metavar="TARGET",
                    help="PID, pid:N or a libvirt domain name (or give --domain-xml/--spec)")
    spec_opts(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("serve", "resident service: keep every VM right as the host changes (mount and "
             "device events, VM starts and exits, a local socket)", cmd_serve)
    sp.add_argument("--config", metavar="FILE", help="host configuration (default "
                    "$NSMOUNT_CONFIG or /etc/nsmount/nsmount.conf)")
    sp.add_argument("--policy", metavar="FILE", help="device policy: which users may have "
                    "which device fds (default: the config's 'policy', else "
                    "/etc/nsmount/policy.toml; absent: nothing granted; reloaded on SIGHUP)")
    sp.add_argument("--metrics-file", metavar="PATH",
                    help="write Prometheus text metrics here (atomically)")
    sp.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                    help="deadline per VM (default from the config, else 30)")
    sp.add_argument("--jobs", type=_positive_int, metavar="N",
                    help="worker processes per batch")

    sp = add("list", "VMs nsmount manages (from the service when it runs, else the records)",
             cmd_list)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("libvirt-hook", "entry point for libvirt's qemu hook (never fails)", cmd_hook)
    sp.add_argument("hook_args", nargs=argparse.REMAINDER, metavar="DOMAIN OP SUBOP EXTRA")

    for name, verb, func in (("install-hook", "install", cmd_install_hook),
                             ("uninstall-hook", "remove", cmd_uninstall_hook)):
        sp = add(name, f"{verb} the libvirt qemu hook", func)
        sp.add_argument("--hooks-dir", default="/etc/libvirt/hooks", metavar="DIR",
                        help="default /etc/libvirt/hooks")
        sp.add_argument("--dry-run", action="store_true", help="show, change nothing")
        sp.add_argument("--legacy", action="store_true",
                        help="hooks/qemu, chaining an existing one (libvirt < 6.5) instead "
                        "of hooks/qemu.d/50-nsmount")

    sp = add("completion", "print a shell completion script", cmd_completion)
    sp.add_argument("shell", choices=("bash", "zsh", "tcsh"))

    add("man", "print the manual page (roff)", cmd_man)

    Parser.all_options = {o for a in _walk_actions(p) for o in a.option_strings}
    return p


def _walk_actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    out = []
    for a in p._actions:
        out.append(a)
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                out += _walk_actions(sp)
    return out


# ---------------------------------------------------------------- helpers
def _read(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not UTF-8 text") from None


def _load_spec(args: argparse.Namespace, required: bool = True) -> Any:
    from ..model.spec import VmSpec

    if getattr(args, "domain_xml", None):
        from ..model.libvirt_xml import spec_from_domain_xml

        return spec_from_domain_xml(_read(args.domain_xml))
    if getattr(args, "spec", None):
        return VmSpec.from_text(_read(args.spec), filename=args.spec)
    return VmSpec() if required else None


def _kw(args: argparse.Namespace) -> dict[str, object]:
    return {"explicit": _load_spec(args, required=False), "lvdir": args.libvirt_state_dir,
            "sdir": args.state_dir, "timeout": args.timeout}


def _command(args: argparse.Namespace) -> list[str]:
    argv = list(args.command)
    if argv and argv[0] == "--":
        return argv[1:]
    if argv and argv[0].startswith("-"):
        raise UsageError(f"{args.cmd}: unknown option {argv[0]!r} "
                         "(put the command after --)")
    return argv


def _summary(o: Any) -> None:
    """-v: one line per VM (where its spec came from, what happened, how long)."""
    log.info("%s: spec from %s, %d drift(s), %d action(s), status %s in %.3fs",
             P.who(o.name, o.pid), o.source, len(o.drifts), len(o.actions), o.status,
             o.seconds)


def outcome_exit(o: Any) -> int:
    """0 ok, 1 repaired or would repair, else the failure's own code (2 by default)."""
    if o.status == "failed":
        return int(o.error_code or EX_FAILED)
    return EX_CHANGED if o.status in ("repaired", "would-repair") else EX_OK


def _forbid(args: argparse.Namespace, why: str, *flags: str) -> None:
    for f in flags:
        if getattr(args, f.lstrip("-").replace("-", "_"), None):
            raise UsageError(f"{args.cmd}: {f} {why}")


# ---------------------------------------------------------------- commands
def cmd_exec(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces import launcher

    if args.json and not args.dry_run:
        raise UsageError("exec: --json needs --dry-run (exec prints nothing else)")
    argv = _command(args)
    if not argv and not args.dry_run:
        raise UsageError("exec: no command given (exec [OPTIONS] -- CMD [ARG...])")
    spec = _load_spec(args)
    if not args.dry_run:
        launcher._which(argv)  # a missing command fails before anything is built
    lp = launcher.prepare(spec)
    if args.dry_run:
        if args.json:
            out.json({"spec": spec.to_dict(), "rootless": lp.rootless, "notes": lp.notes,
                      "skipped": [{"path": s.request.path, "reason": s.reason}
                                  for s in lp.skipped],
                      "actions": [a.to_dict() for a in lp.actions]})
        else:
            for s in lp.skipped:
                out.line(f"skip {s.request.path}: {s.reason}")
            for note in lp.notes:
                out.line(f"note: {note}")
            mode = " (rootless: user + mount namespace)" if lp.rootless else ""
            P.plan(out, lp.actions, f"plan for {spec.name or 'vm'}{mode} "
                   f"(then exec {' '.join(argv) or '<command>'}):")
        return EX_OK
    launcher.check_privileges(lp)
    sys.stdout.flush()
    launcher.exec_in_namespace(spec, argv, state_dir=args.state_dir, lp=lp)


def cmd_demo(args: argparse.Namespace, out: P.Out) -> int:
    from .demo import run_demo

    return run_demo(keep_sandbox=False, qemu=not args.no_qemu)


def cmd_inspect(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces.repair import inspect

    if args.json and args.output:
        raise UsageError("inspect: -o chooses text columns; --json prints them all")
    o = inspect(args.target, **_kw(args))
    _summary(o)
    if args.json:
        out.json(o.to_dict())
    else:
        P.inspect(out, o, args.output or P.DEFAULT_MOUNT_COLUMNS)
    return int(o.error_code or EX_FAILED) if o.status == "failed" else EX_OK


def cmd_repair(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces import audit
    from ..faces.repair import repair

    o = repair(args.target, dry_run=args.dry_run, rebuild_dev=args.rebuild_dev, **_kw(args))
    audit.log_outcome(o)
    _summary(o)
    out.json(o.to_dict()) if args.json else P.outcome(out, o, verb="repair")
    return outcome_exit(o)


def cmd_device(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces import audit
    from ..faces.repair import device_add, device_remove

    if getattr(args, "fd_to_qmp", None):
        return _fd_to_qmp(args, out)
    if args.device_cmd == "add" and os.geteuid() != 0:
        return _bind_via_service(args, out)
    _forbid(args, "goes with --fd-to-qmp (or, for a non-root user, the service's "
            "device-bind)", "--read-only")
    fn = device_add if args.device_cmd == "add" else device_remove
    o = fn(args.target, args.paths, dry_run=args.dry_run, **_kw(args))
    audit.log_outcome(o)
    _summary(o)
    out.json(o.to_dict()) if args.json else P.outcome(out, o, verb=args.device_cmd)
    return outcome_exit(o)


def _bind_via_service(args: argparse.Namespace, out: P.Out) -> int:
    """``device add TARGET PATH...`` by a non-root user: the service binds each node
    into the user's own rootless VM, as its device policy allows (``device-bind``).
    Exit 1 when something was bound, 0 when everything was there already."""
    from ..faces.fdclient import bind_device
    from ..state.sources import resolve_target

    _forbid(args, "does not apply to the service's device-bind (a non-root user)",
            "--spec", "--domain-xml")
    pid, name = resolve_target(args.target, lvdir=args.libvirt_state_dir)
    write = not args.read_only
    if args.dry_run:
        for p in args.paths:
            out.line(f"would ask the nsmount service to bind {p} "
                     f"({'read-write' if write else 'read-only'}) into pid {pid}")
        return EX_OK
    rows = [bind_device(p, pid=pid, write=write, timeout=args.timeout) for p in args.paths]
    if args.json:
        out.json({"pid": pid, "name": name, "via": "service", "devices": rows})
    else:
        for r in rows:
            out.line(f"{r.get('status')}: {r.get('path')} ({r.get('node')}, "
                     f"{'read-only' if r.get('read_only') else 'read-write'}) in pid {pid}")
    return EX_CHANGED if any(r.get("status") == "bound" for r in rows) else EX_OK


def _fd_to_qmp(args: argparse.Namespace, out: P.Out) -> int:
    """``device add --fd-to-qmp SOCK TARGET PATH...``: open each device (verified under
    /dev by the safe resolver) and hand it to TARGET's QEMU with QMP add-fd; one
    ``/dev/fdset/N`` line per device on stdout (exit 0), nothing made in the VM."""
    from ..faces import audit, fdpass
    from ..state.sources import resolve_target
    from ..state.target import starttime

    _forbid(args, "does not apply with --fd-to-qmp (no namespace work is done)",
            "--spec", "--domain-xml")
    pid, name = resolve_target(args.target, lvdir=args.libvirt_state_dir)
    start = starttime(pid)  # the target exists (NoSuchProcessError, exit 9, if not)
    write = not args.read_only
    if args.dry_run:
        devs = [fdpass.resolve_device(p) for p in args.paths]
        if args.json:
            out.json({"pid": pid, "name": name, "qmp": args.fd_to_qmp, "dry_run": True,
                      "fds": [{"path": p, "node": n.path, "kind": n.kind,
                               "read_only": not write} for p, n in devs]})
        else:
            for p, n in devs:
                out.line(f"would pass {p} ({n.path}, {n.kind} {n.major}:{n.minor}, "
                         f"{'read-write' if write else 'read-only'}) to pid {pid} over "
                         f"{args.fd_to_qmp}")
        return EX_OK
    rows: list[dict[str, Any]] = []
    opener = None
    if os.geteuid() != 0:  # a user's launcher: the service opens, as its policy allows
        from ..faces.fdclient import ServiceUnavailableError, obtain_device

        def opener(path: str, write: bool) -> fdpass.DeviceFd:
            try:
                return obtain_device(path, pid=pid, write=write, timeout=args.timeout)
            except ServiceUnavailableError as exc:  # no service: the user's own rights
                try:
                    return fdpass.open_device(path, write=write)
                except PrivilegeError as perm:
                    raise PrivilegeError(f"{perm}; and {exc}", hint="start nsmount serve "
                                         "with a device policy granting this user the "
                                         "device (docs/service.rst)") from None
    for p in args.paths:
        if starttime(pid) != start:
            from ..errors import NoSuchProcessError

            raise NoSuchProcessError(f"pid {pid} was reused during the run")
        dev, fs = fdpass.pass_device(args.fd_to_qmp, p, write=write, expect_pid=pid,
                                     timeout=args.timeout, opener=opener)
        via = " (fd from the nsmount service)" if opener is not None else ""
        audit.log_host("pass-fd", dev.node.path, before="-",
                       after=f"{'rw' if write else 'ro'} fd given to {audit.vm_label(name, pid)} "
                       f"as {fs.path}{via}")
        rows.append({**dev.to_dict(), **fs.to_dict()})
    if args.json:
        out.json({"pid": pid, "name": name, "qmp": args.fd_to_qmp, "fds": rows})
    else:
        for r in rows:
            out.data(r["fdset"])
    return EX_OK


def cmd_missing_sub(args: argparse.Namespace, out: P.Out) -> int:  # pragma: no cover
    raise UsageError("device: add or remove?")


def cmd_serve(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces.service import config
    from ..faces.service.serve import Service

    if not args.quiet:  # a service logs what it does (journald keeps it)
        logging.getLogger("nsmount").setLevel(logging.INFO if not args.verbose
                                              else logging.DEBUG)
    cfg = config.load(args.config)  # a bad file at start is an error (exit 3)
    svc = Service(cfg, config_arg=args.config, policy=args.policy, sdir=args.state_dir,
                  lvdir=args.libvirt_state_dir, metrics_file=args.metrics_file,
                  timeout=args.timeout, workers=args.jobs)
    svc.start()
    svc.run()
    return EX_OK


def cmd_list(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces.service.inventory import list_vms

    origin, vms = list_vms(args.state_dir, args.libvirt_state_dir)
    if args.json:
        out.json({"from": origin, "vms": vms})
    else:
        P.vm_list(out, origin, vms)
    return EX_OK


def cmd_spec(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces.specreport import build_report, format_text

    rep = build_report(args)
    if args.json:
        out.json(rep)
    else:
        for line in format_text(rep):
            out.data(line)
    return EX_OK


def cmd_run_in(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces.repair import run_in

    argv = _command(args)
    if not argv:
        raise UsageError("run-in: no command given (run-in TARGET -- CMD [ARG...])")
    sys.stdout.flush()
    run_in(args.target, argv, lvdir=args.libvirt_state_dir, sdir=args.state_dir)


def cmd_propagation(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces.propagation import check, make_rshared

    if args.dry_run and not args.fix:
        raise UsageError("propagation: --dry-run goes with --fix (--check changes "
                         "nothing anyway)")
    paths = args.mountpoints or None
    rows = check(paths)
    if args.fix:
        if make_rshared(rows, dry_run=args.dry_run) and not args.dry_run:
            rows = check(paths)
    ok = all(r["ok"] for r in rows)
    if args.json:
        out.json({"mounts": rows, "ok": ok})
    else:
        P.propagation(out, rows, fix=args.fix, dry_run=args.dry_run)
    if ok:
        return EX_OK
    return EX_FAILED if args.fix and not args.dry_run else EX_CHANGED


def cmd_reconnect(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces import audit
    from ..faces.reconnect import reconnect, reconnect_one

    if args.target:
        _forbid(args, "does not apply to a single TARGET", "--jobs", "--no-scan")
    kw: dict[str, Any] = {"dry_run": args.dry_run, "jobs": args.jobs or os.cpu_count() or 1,
                          "sdir": args.state_dir, "lvdir": args.libvirt_state_dir,
                          "timeout": args.timeout,
                          "progress": None if args.quiet else P.progress()}
    if args.target:
        rep = reconnect_one(args.target, **kw)
    else:
        rep = reconnect(scan=not args.no_scan, **kw)
    audit.log_outcomes(rep.outcomes, via="reconnect")
    for o in rep.outcomes:
        _summary(o)
    out.json(rep.to_dict()) if args.json else P.reconnect(out, rep)
    s = rep.summary()
    if s["failed"]:
        return EX_FAILED
    return EX_CHANGED if s["repaired"] or s["would-repair"] else EX_OK


def cmd_hook(args: argparse.Namespace, out: P.Out) -> int:
    """libvirt's hook: never fails, whatever happens (the VM would be killed)."""
    try:
        _syslog()
        from ..faces.hook import run_hook

        try:
            from ..state.files import MAX_XML

            # libvirt writes the domain XML and closes stdin; more is not libvirt's
            data = (b"" if sys.stdin is None or sys.stdin.isatty()
                    else sys.stdin.buffer.read(MAX_XML + 1))
            if len(data) > MAX_XML:
                log.warning("libvirt-hook: domain XML on stdin is over %d bytes; ignored",
                            MAX_XML)
                data = b""
        except (OSError, ValueError):
            data = b""
        for msg in run_hook(list(args.hook_args), data.decode("utf-8", "replace"),
                            lvdir=args.libvirt_state_dir):
            log.warning(msg)
    except BaseException as exc:
        try:
            log.error("libvirt-hook: internal error: %r", exc)
        except BaseException:
            pass
    return EX_OK


def _syslog() -> None:
    """The hook's records go to syslog (the journal) too; stderr lands in the domain log."""
    import logging.handlers

    class Quiet(logging.handlers.SysLogHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            pass  # no syslog daemon: stderr (the domain log) still has it

    try:
        h = Quiet(address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return
    h.ident = "nsmount: "
    h.setFormatter(_SafeFormatter("%(message)s"))
    h.setLevel(logging.INFO)
    logging.getLogger("nsmount").addHandler(h)
    logging.getLogger("nsmount").setLevel(logging.INFO)


def _hook_files(args: argparse.Namespace, out: P.Out, fn: Callable[..., list[str]],
                what: str) -> int:
    from ..faces import audit

    for line in fn(args.hooks_dir, legacy=args.legacy, dry_run=args.dry_run):
        out.line(("would " if args.dry_run else "") + line)
        if not args.dry_run and not line.endswith(("installed", "chains nsmount")):
            audit.log_host(what, args.hooks_dir, before="-", after=line)
    return EX_OK


def cmd_install_hook(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces.hook import install

    _hook_files(args, out, install, "install-hook")
    if not args.legacy:
        out.line("note: libvirt >= 6.5 runs hooks in qemu.d/; restart libvirtd to pick it up")
    return EX_OK


def cmd_uninstall_hook(args: argparse.Namespace, out: P.Out) -> int:
    from ..faces.hook import uninstall

    return _hook_files(args, out, uninstall, "uninstall-hook")


def cmd_completion(args: argparse.Namespace, out: P.Out) -> int:
    import shtab

    out.raw(shtab.complete(build_parser(), shell=args.shell))
    return EX_OK


def cmd_man(args: argparse.Namespace, out: P.Out) -> int:
    from .manpage import manpage

    out.raw(manpage(build_parser(), EXIT_CODES))
    return EX_OK


# ---------------------------------------------------------------- main
class _SafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return safe_line(super().format(record))


def _setup_logging(verbose: int, quiet: bool) -> None:
    root = logging.getLogger("nsmount")
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_SafeFormatter("nsmount: %(levelname)s: %(message)s"))
    root.addHandler(h)
    root.propagate = False
    root.setLevel(logging.ERROR if quiet else logging.WARNING if not verbose else
                  logging.INFO if verbose == 1 else logging.DEBUG)
    # the audit trail (what nsmount changed) is shown by default; -q keeps only errors
    logging.getLogger("nsmount.faces.audit").setLevel(logging.ERROR if quiet else logging.INFO)


def _stderr(msg: str) -> None:
    try:
        sys.stderr.write(safe_line(msg) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _on_sigint(main_pid: int) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked reconnect worker: end without a traceback
            os._exit(EX_INTERRUPTED)
        raise KeyboardInterrupt

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    out = P.Out()
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
            except (AttributeError, ValueError):
                pass
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint(os.getpid()))
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.quiet and args.verbose:
            raise UsageError("-q and -v contradict each other")
        _setup_logging(args.verbose, args.quiet)
        if getattr(args, "libvirt_config", None):  # seen by every spec source, workers too
            os.environ["NSMOUNT_LIBVIRT_CONFIG"] = args.libvirt_config
        log.debug("nsmount %s, arguments %s", __version__, vars(args))
        out.quiet = args.quiet
        return int(args.func(args, out) or 0)
    except UsageError as exc:
        _stderr(f"nsmount: error: {exc} (see nsmount --help)")
        return EX_USAGE
    except BrokenPipeError:
        out.close_quietly()
        return EX_OK
    except NsmountError as exc:
        _stderr(f"nsmount: error: {exc.oneline()}")
        return exc.exit_code
    except OSError as exc:
        err = from_oserror(exc, "system error")
        _stderr(f"nsmount: error: {err.oneline()}")
        return err.exit_code
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    finally:
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            out.close_quietly()
