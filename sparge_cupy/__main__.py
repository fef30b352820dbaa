"""``python -m sparge_cupy``: the ``sparge-cupy`` command (see :mod:`sparge_cupy.cli`)."""
import sys

from .cli import main

sys.exit(main())
