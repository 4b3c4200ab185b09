"""The one exception type the CLI turns into a single readable line."""


class ElmgenError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""
