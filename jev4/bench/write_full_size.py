"""Child-process entry: write the full-size random bf16 checkpoint to argv[1]."""

import logging
import sys

from jev4.model.synthetic import write_random_checkpoint

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    write_random_checkpoint(sys.argv[1], force=True)
