"""The seed's entry point: `python train.py --config FILE --train_steps N [--checkpoint_path CKPT]`."""

import sys

if __name__ == "__main__":
    try:
        from smollm2.cli import train_main  # torch takes seconds to import: Ctrl-C may come first
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(train_main())
