"""`python -m tun2sx` runs the command line."""

import sys

from tun2sx.cli import main

sys.exit(main())
