"""The command line: argument parsing, printing and exit codes (the only layer that prints).

``nsmount.cli.main:main`` is the console script; :mod:`.printers` formats reports,
:mod:`.manpage` makes the man page from the parser."""

from .main import EX_NOINPUT, EX_USAGE, EXIT_CODES, build_parser, main

__all__ = ["EXIT_CODES", "EX_NOINPUT", "EX_USAGE", "build_parser", "main"]
