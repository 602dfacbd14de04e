"""`python -m core.train`: train a SecondLook model and write its weights and card (see `core.lab.train`)."""

import logging
import os

from core.lab.train import get_args_parser, main

if __name__ == "__main__":
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s %(name)s [rank {rank}] %(message)s")
    main(get_args_parser().parse_args())
