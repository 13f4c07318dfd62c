"""`python -m tun2sx` runs the command line."""

import sys

from tun2sx.control.cli import main

sys.exit(main())
