"""Thin command-line front end: parse, call the library, print, map errors to exit codes.

Exit codes: 0 clean/ok, 1 repaired (repair/reconnect), 2+ errors, one per
NsmountError kind (see nsmount.errors), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import NsmountError, SpecError, from_oserror

log = logging.getLogger("nsmount")


def _load_spec(args: argparse.Namespace, required: bool = True) -> Any:
    from .model.spec import VmSpec

    if getattr(args, "domain_xml", None):
        from .model.libvirt_xml import spec_from_domain_xml

        return spec_from_domain_xml(_read(args.domain_xml))
    if getattr(args, "spec", None):
        return VmSpec.from_text(_read(args.spec), filename=args.spec)
    if required:
        return VmSpec()
    return None


def _read(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not UTF-8 text") from None


def _print_actions(actions: Sequence[Any], header: str) -> None:
    print(header)
    for i, a in enumerate(actions, 1):
        why = f"   # {a.reason}" if a.reason else ""
        print(f"  {i:3}. {a.describe()}{why}")


# ---------------------------------------------------------------- commands
def cmd_exec(args: argparse.Namespace) -> int:
    from . import launcher

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    spec = _load_spec(args)
    if not args.dry_run:
        launcher._which(argv)  # a missing command fails before anything is built
    lp = launcher.prepare(spec)
    if args.dry_run:
        if args.json:
            print(json.dumps({"spec": spec.to_dict(),
                              "skipped": [{"path": s.request.path, "reason": s.reason}
                                          for s in lp.skipped],
                              "actions": [a.to_dict() for a in lp.actions]}, indent=1))
        else:
            for s in lp.skipped:
                print(f"skip {s.request.path}: {s.reason}")
            _print_actions(lp.actions, f"plan for {spec.name or 'vm'} "
                           f"(then exec {' '.join(argv) or '<command>'}):")
        return 0
    launcher.check_privileges()
    launcher.exec_in_namespace(spec, argv, state_dir=args.state_dir, lp=lp)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep_sandbox=False, qemu=not args.no_qemu)


def _lazy(modname: str, fn: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        import importlib

        mod = importlib.import_module(f"nsmount.{modname}")
        return getattr(mod, fn)(args)  # type: ignore[no-any-return]

    return call


def _seconds(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < val <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text!r}")
    return val


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nsmount", description="Mount-namespace and mount-propagation manager for QEMU VMs")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--state-dir", help="nsmount state dir (default $NSMOUNT_STATE_DIR or "
                   "/run/nsmount)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def spec_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--domain-xml", metavar="FILE", help="libvirt domain XML ('-' = stdin)")
        g.add_argument("--spec", metavar="FILE", help="TOML/JSON VM spec ('-' = stdin)")

    sp = sub.add_parser("exec", help="build a VM namespace and exec a command in it")
    spec_opts(sp)
    sp.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    sp.set_defaults(func=cmd_exec)

    sp = sub.add_parser("demo", help="build, break and repair a demo VM in a private sandbox")
    sp.add_argument("--no-qemu", action="store_true", help="use a stand-in process, not QEMU")
    sp.set_defaults(func=cmd_demo)

    def timeout_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                        help="deadline for the work on one VM; a VM that blocks longer is "
                        "abandoned (default 30)")

    def target_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("target", metavar="TARGET", help="PID, pid:N or a libvirt domain name")
        spec_opts(sp)
        sp.add_argument("--libvirt-state-dir", help="default $NSMOUNT_LIBVIRT_STATE_DIR or "
                        "/run/libvirt/qemu")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        timeout_opt(sp)

    sp = sub.add_parser("inspect", help="show a VM namespace's mounts, /dev and drift")
    target_opts(sp)
    sp.set_defaults(func=_lazy("repair", "cmd_inspect"))

    sp = sub.add_parser("repair", help="fix a running VM's namespace (exit 0 clean, 1 repaired)")
    target_opts(sp)
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--rebuild-dev", action="store_true",
                    help="build a fresh minimal /dev and swap it in atomically")
    sp.set_defaults(func=_lazy("repair", "cmd_repair"))

    sp = sub.add_parser("device", help="hotplug device nodes into a running VM")
    dsub = sp.add_subparsers(dest="device_cmd", required=True)
    for name in ("add", "remove"):
        dp = dsub.add_parser(name)
        target_opts(dp)
        dp.add_argument("paths", nargs="+", metavar="PATH")
        dp.add_argument("--dry-run", action="store_true")
        dp.set_defaults(func=_lazy("repair", f"cmd_device_{name}"))

    sp = sub.add_parser("run-in", help="run a command inside a VM's mount namespace")
    target_opts(sp)
    sp.add_argument("command", nargs=argparse.REMAINDER)
    sp.set_defaults(func=_lazy("repair", "cmd_run_in"))

    sp = sub.add_parser("propagation", help="check or fix host mount propagation (rshared)")
    grp = sp.add_mutually_exclusive_group()
    grp.add_argument("--check", action="store_true", help="report only (default)")
    grp.add_argument("--fix", action="store_true", help="make the mounts rshared")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("mountpoints", nargs="*", metavar="MOUNTPOINT")
    sp.set_defaults(func=_lazy("propagation", "cmd_propagation"))

    sp = sub.add_parser("reconnect", help="repair every running VM (or one) after a daemon "
                        "restart")
    sp.add_argument("target", nargs="?", metavar="TARGET")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--jobs", type=int, default=0, help="worker processes (default: one per CPU)")
    sp.add_argument("--libvirt-state-dir")
    sp.add_argument("--no-scan", action="store_true", help="skip the process-table scan")
    timeout_opt(sp)
    sp.set_defaults(func=_lazy("reconnect", "cmd_reconnect"))

    sp = sub.add_parser("libvirt-hook", help="entry point for /etc/libvirt/hooks/qemu")
    sp.add_argument("hook_args", nargs="*")
    sp.set_defaults(func=_lazy("hook", "cmd_hook"))

    sp = sub.add_parser("install-hook", help="install the libvirt qemu hook")
    sp.add_argument("--hooks-dir", default="/etc/libvirt/hooks")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--legacy", action="store_true",
                    help="chain from hooks/qemu (libvirt < 6.5) instead of hooks/qemu.d/")
    sp.set_defaults(func=_lazy("hook", "cmd_install_hook"))

    from .service.commands import add_parsers as add_service_parsers  # serve, list

    add_service_parsers(sub, _lazy)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        try:  # a name a VM chose must never crash the report (it is escaped anyway)
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="nsmount: %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except NsmountError as exc:
        print(f"nsmount: error: {exc.oneline()}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        err = from_oserror(exc, "system error")
        print(f"nsmount: error: {err.oneline()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
