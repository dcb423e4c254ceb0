"""``python -m runner.results`` is ``runner-results``."""
import sys

from .cli import main

sys.exit(main())
