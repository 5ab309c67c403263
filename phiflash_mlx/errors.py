"""Errors a user can act on. The command line prints them as one line, without a traceback."""


class PhiflashError(Exception):
    """Base class: the message names the problem and what to do about it."""
