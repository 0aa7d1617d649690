"""`python -m tuneplane.cli`: the same as the `tuneplane` command."""

from tuneplane.cli import main

main()
