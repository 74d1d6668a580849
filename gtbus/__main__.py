"""``python -m gtbus`` is the ``gtbus`` command."""

from gtbus.cli.main import main

main()
