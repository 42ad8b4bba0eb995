"""`python -m instret` is the `instret` command."""

from instret.cli.main import main

main()
