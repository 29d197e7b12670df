"""``python -m ctxmix``: the same command line as the ``ctxmix`` script."""

from .cli import main

if __name__ == "__main__":
    main()
