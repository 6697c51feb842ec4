"""`python -m imagegen.cli` runs the command line."""

from . import main

main()
