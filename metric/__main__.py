"""``python -m metric ...`` = ``xbn-metric ...``."""

import sys

from metric.cli import main

sys.exit(main())
