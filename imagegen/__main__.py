"""`python -m imagegen` runs the command line."""

from .cli import main

main()
