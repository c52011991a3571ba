"""`python -m routelab ...` (and `torchrun -m routelab ...`) is the `routelab` command."""

import sys

from routelab.cli import main

sys.exit(main())
