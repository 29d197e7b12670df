"""``python -m ctxmix_train`` (and ``torchrun -m ctxmix_train``) = ``ctxmix-train``."""

from .cli import main

main()
