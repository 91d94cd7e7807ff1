"""Entry point for ``python -m payscope``."""

from payscope.cli import main

main()
