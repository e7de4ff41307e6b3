"""``python -m jetfast.cli`` (and ``torchrun ... -m jetfast.cli``): the ``jetfast`` command."""

import sys

from jetfast.cli import main

sys.exit(main())
