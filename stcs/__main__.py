"""``python -m stcs``: the same as the ``stcs`` console script."""

import sys

from stcs.cli import main

sys.exit(main())
