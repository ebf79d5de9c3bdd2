"""``python -m trio_embarcadero.tools.bench``: the same as ``trio-embarcadero bench``."""

import sys

from .command import main

sys.exit(main())
