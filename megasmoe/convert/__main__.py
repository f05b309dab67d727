"""``python -m megasmoe.convert to-hf|from-hf|verify ...``."""

import sys
import warnings

from megasmoe.convert.cli import main

if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch)\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    sys.exit(main())
