"""A module whose import fails, for the python handler tests."""

raise RuntimeError("broken at import")
