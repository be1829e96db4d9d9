"""``python -m spmc``."""

import sys

from spmc.cli import main

sys.exit(main())
