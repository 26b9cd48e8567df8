"""``python -m service.cli``: the command line (``main.main``)."""

import sys

from service.cli.main import main

sys.exit(main())
