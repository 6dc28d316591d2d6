"""``python -m hive_cli`` is the ``hive`` command."""

import sys

from hive_cli.cli import main

sys.exit(main())
