"""``python -m validate.experiments``: see :mod:`validate.experiments.cli`."""

import sys

from validate.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
