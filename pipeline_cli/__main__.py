"""``python -m pipeline_cli`` runs the same CLI as the ``pipeline`` console script."""

from . import main

main()
