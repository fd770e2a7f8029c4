"""`python -m deepmode_async`: the `deepmode` command line."""

from .cli import main

main()
