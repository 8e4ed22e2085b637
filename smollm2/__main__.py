import sys

if __name__ == "__main__":  # not when a `prepare --workers` process imports this module as its parent's main
    try:
        from smollm2.cli import main  # torch takes seconds to import: Ctrl-C may come first
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
