"""``python -m tcbridge``: the same as the ``tcbridge`` console script."""

from __future__ import annotations

import sys

from tcbridge.cli import main

sys.exit(main())
