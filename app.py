"""The Space's entry point: a SmolLM2 model to talk to and its training to watch (smollm2/app.py)."""

from smollm2.app import main

if __name__ == "__main__":
    main()
