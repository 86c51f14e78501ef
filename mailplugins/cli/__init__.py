"""The ``mailplugins`` command; daemons add their subcommands through ``mailplugins.commands``.

``app`` holds the state a command gets and the output helpers, ``accounts`` and ``wiring`` the
command groups, ``main`` the parser and the entry point. What a daemon's command module needs
(the ``App`` its handlers get, the error and output helpers) is importable from here.
"""

from mailplugins.cli.app import (
    EXIT_FAILED,
    EXIT_USAGE,
    CommandError,
    command_group,
    nameserver_option,
    print_json,
    print_table,
)
from mailplugins.cli.main import App, build_parser, main

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "App",
    "CommandError",
    "build_parser",
    "command_group",
    "main",
    "nameserver_option",
    "print_json",
    "print_table",
]
