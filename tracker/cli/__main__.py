"""``python -m tracker.cli``: the same as the ``tracker`` console script."""

from tracker.cli import main

main(prog_name="tracker")
