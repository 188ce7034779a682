"""The error a row of a dataset raises when it cannot be used: every stage of the data flow raises it, naming the row
and the fix, so that a map can report it (or, with `on_error="null"`, give that row null values)."""


class RowError(ValueError):
    """A dataset row that cannot be turned into model inputs; the message names the row and the fix."""
