"""``python -m gm`` runs the ``gmem`` command line."""

import sys

from gm.cli import main

sys.exit(main())
