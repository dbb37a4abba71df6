"""``python -m xenbind.stream inspect|replay``: see xenbind.stream.cli."""

import sys

from .cli import main

sys.exit(main())
