"""``python -m neuralode`` is the ``neuralode`` command."""

import sys

from neuralode.cli import main

if __name__ == "__main__":
    sys.exit(main())
