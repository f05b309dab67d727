"""``python -m megasmoe.launch``."""

import sys

from megasmoe.launch.cli import main

sys.exit(main())
