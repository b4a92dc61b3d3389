"""``python -m ksi_host.cli``: the same as the ``ksi-host`` command."""

import sys

from .main import main

sys.exit(main())
