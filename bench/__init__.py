"""tcbridge's benchmark suite (issue 6): ``python -m bench`` or ``make bench``."""
