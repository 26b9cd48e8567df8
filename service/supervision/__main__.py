"""``python -m service.supervision``: what ``gradcam-service serve`` execs into
(``supervisor.main``), so that ``supervisor`` keeps its own module name, and so its
logger's."""

import sys

from service.supervision.supervisor import main

sys.exit(main())
