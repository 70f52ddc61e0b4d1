"""`python -m sovereign` runs the CLI."""

from sovereign.cli import main

main()
