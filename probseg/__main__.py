"""``python -m probseg`` runs the ``probseg`` command."""

import sys

from probseg.cli import main

sys.exit(main())
