"""Run the command line as ``python -m minidisel``."""

import sys

from minidisel.cli import main

sys.exit(main())
