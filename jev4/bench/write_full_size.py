"""Child-process entry: write the random-weight source checkpoint to argv[1]: full size (default) or argv[2] == "tiny"."""

import logging
import sys

from jev4.model.synthetic import write_random_checkpoint
from jev4.model.tiny import write_tiny_checkpoint

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if len(sys.argv) > 2 and sys.argv[2] == "tiny":
        write_tiny_checkpoint(sys.argv[1], seed=0, force=True)
    else:
        write_random_checkpoint(sys.argv[1], force=True)
