"""``python -m jdsearch.cli``: the command line, as ``python -m jdsearch``."""

import sys

from jdsearch.cli import main

sys.exit(main())
