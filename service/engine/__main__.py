"""``python -m service.engine``: one engine process (``process.main``; its command line is
``transport.interface.engine_command``). Run this way, ``process`` keeps its own module
name, and so its logger's."""

import sys

from service.engine.process import main

sys.exit(main())
