"""`python -m core.evaluate`: score weights on a labelled folder, per image or per patient (see `core.lab.evaluate`)."""

import logging
import sys

from core.lab.evaluate import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
