"""``python -m itscale``: the ``itscale`` command line."""

import sys

from .cli import main

sys.exit(main())
