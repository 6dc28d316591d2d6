"""``python -m hive_worker``: same as the ``hive-worker`` command."""

import sys

from hive_worker.cli import main

sys.exit(main())
