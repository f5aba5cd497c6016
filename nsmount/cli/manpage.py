"""The manual page, generated from the argument parser (``nsmount man``, ``./run docs``).

One source for ``--help``, the man page and shell completion: the parser built by
:func:`nsmount.cli.main.build_parser`.  Output is plain man(7) roff.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

from .. import __version__

_SEE_ALSO = ("findmnt(8)", "lsns(8)", "nsenter(1)", "mount_namespaces(7)", "virsh(1)",
             "libvirtd(8)")
_ENV = (("NSMOUNT_STATE_DIR", "nsmount's state dir (launch records, locks); "
         "default /run/nsmount"),
        ("NSMOUNT_LIBVIRT_STATE_DIR", "libvirt's QEMU state dir; default /run/libvirt/qemu"))
_FILES = (("/run/nsmount/vms/PID.json", "what nsmount built for a VM it launched"),
          ("/etc/libvirt/hooks/qemu.d/50-nsmount", "the libvirt hook (install-hook)"))


def esc(text: str) -> str:
    """Text for roff: backslashes, hyphens, and a leading dot or quote made literal."""
    t = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + t if t.startswith((".", "'")) else t


def _opt(a: argparse.Action) -> str:
    names = ", ".join(f"\\fB{esc(o)}\\fR" for o in a.option_strings)
    meta = a.metavar if isinstance(a.metavar, str) else a.dest.upper()
    if a.nargs != 0 and a.option_strings:
        names += f" \\fI{esc(meta)}\\fR"
    if not a.option_strings:
        names = f"\\fI{esc(str(a.metavar or a.dest))}\\fR"
    return names


def _options(actions: Iterable[argparse.Action], skip: set[str]) -> list[str]:
    out: list[str] = []
    for a in actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.help == argparse.SUPPRESS or set(a.option_strings) & skip:
            continue
        if a.choices and not a.option_strings:
            help_ = f"one of: {', '.join(map(str, a.choices))}"
        else:
            help_ = a.help or ""
        out += [".TP", _opt(a), esc(help_)]
    return out


def _subparsers(p: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    found: list[tuple[str, argparse.ArgumentParser, str]] = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in a._choices_actions}
            for name, sp in a.choices.items():
                sub = _subparsers(sp)
                if sub:
                    found += sub
                else:
                    found.append((sp.prog, sp, helps.get(name, "")))
    return found


def manpage(parser: argparse.ArgumentParser, exit_codes: Sequence[tuple[int, str]]) -> str:
    glob = {o for a in parser._actions for o in a.option_strings
            if o not in ("-h", "--help", "--version")}
    lines = [
        f'.TH NSMOUNT 8 "" "nsmount {esc(__version__)}" "System Administration"',
        ".SH NAME", f"nsmount \\- {esc(parser.description or '').rstrip('.')}",
        ".SH SYNOPSIS", ".B nsmount", "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR "
        "[\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        "A VM manager (libvirt's QEMU driver is the reference) starts each QEMU in a "
        "private mount namespace with its own tiny /dev on tmpfs.  "
        "\\fBnsmount\\fR builds such namespaces and repairs them while the VM runs.",
        ".PP", "\\fITARGET\\fR is a PID, pid:N or a libvirt domain name.  "
        "Global options may be given before or after the command.",
        ".SH GLOBAL OPTIONS",
        *_options(parser._actions, set()),
        ".SH COMMANDS",
    ]
    for prog, sp, help_ in _subparsers(parser):
        usage = " ".join(sp.format_usage().split())
        usage = usage.removeprefix("usage: ")
        lines += [f".SS {esc(prog)}", esc(help_[:1].upper() + help_[1:] + "."),
                  ".PP", f"\\fB{esc(usage)}\\fR"]
        opts = _options(sp._actions, glob)
        if opts:
            lines += [".RS", *opts, ".RE"]
    lines += [".SH EXIT STATUS"]
    for code, what in exit_codes:
        lines += [".TP", f".B {code}", esc(what)]
    lines += [".SH ENVIRONMENT"]
    for k, v in _ENV:
        lines += [".TP", f".B {k}", esc(v)]
    lines += [".SH FILES"]
    for k, v in _FILES:
        lines += [".TP", f".I {esc(k)}", esc(v)]
    lines += [".SH SEE ALSO", ", ".join(f"\\fB{esc(x.split('(')[0])}\\fR({x.split('(')[1]}"
                                        for x in _SEE_ALSO)]
    return "\n".join(lines) + "\n"
