"""`python -m recommendations`: the process entry point."""

import sys

from recommendations.app import main

sys.exit(main(sys.argv[1:]))
