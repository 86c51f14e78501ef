"""``python -m mailplugins.cli``: the same as the installed ``mailplugins`` command."""

import sys

from mailplugins.cli.main import main

sys.exit(main())
