"""``python -m cachefs.cli``: what the tests and the demo run in a subprocess."""

from .commands import main

main()
