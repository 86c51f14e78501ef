"""The ``mailplugins`` command; daemons add their subcommands through ``mailplugins.commands``.

What a daemon's command module needs (the ``App`` its handlers get, the error and output
helpers) is importable from here.
"""

from mailplugins.cli.main import (
    EXIT_FAILED,
    EXIT_USAGE,
    App,
    CommandError,
    build_parser,
    main,
    nameserver_option,
    print_json,
    print_table,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "App",
    "CommandError",
    "build_parser",
    "main",
    "nameserver_option",
    "print_json",
    "print_table",
]
