"""`python -m gemb.train ...` is `gemb train ...`."""

import sys

from gemb.train.main import main

if __name__ == "__main__":
    sys.exit(main())
