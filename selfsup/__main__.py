"""``python -m selfsup`` (also under ``torchrun -m selfsup``)."""

import sys

from selfsup.cli import main

sys.exit(main())
