"""``python -m quart_events``: the same as ``tc-events``."""

from .cli import main

main(prog_name="tc-events")
