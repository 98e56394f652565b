"""`python -m quantbench`: the command line."""

from quantbench.cli import main

main()
