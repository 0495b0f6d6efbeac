"""``python -m data_scripts`` is ``python -m data_scripts.prepare``."""
import sys

from .prepare import main

sys.exit(main())
