"""``python -m bench``: the whole suite (see ``bench.suite``)."""

from .suite import main

main()
