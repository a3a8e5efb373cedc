"""`python -m gateway` is the same as the `bt-gateway` console script."""

import sys

from gateway.cli import main

sys.exit(main())
