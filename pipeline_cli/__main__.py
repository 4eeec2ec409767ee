"""``python -m pipeline_cli`` runs the same CLI as the ``pipeline`` console script."""

from .cli import main

main()
