"""``python -m proxytune.cli``: the same as the ``proxytune`` command."""

import sys

from . import main

sys.exit(main())
