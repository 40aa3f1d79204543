"""``python -m stage1``: the same as the ``stage1`` console script."""

import sys

from stage1.cli import main

sys.exit(main())
