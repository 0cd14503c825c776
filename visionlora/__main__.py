"""``python -m visionlora``: the same as the ``visionlora`` command."""

import sys

from visionlora.cli import main

sys.exit(main())
