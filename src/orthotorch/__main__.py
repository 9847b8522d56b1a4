"""``python -m orthotorch``: the same as the ``orthotorch`` command."""

import sys

from .cli import main

sys.exit(main())
