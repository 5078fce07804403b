"""``python -m jdsearch``: the command line (also under ``torchrun``)."""

import sys

from jdsearch.cli import main

sys.exit(main())
