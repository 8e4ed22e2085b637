"""The seed's entry point: `python train.py --config FILE --train_steps N [--checkpoint_path CKPT]`."""

import sys

from smollm2.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
