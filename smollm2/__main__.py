import sys

try:
    from smollm2.cli import main  # torch takes seconds to import: Ctrl-C may come first
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
sys.exit(main())
