"""The one exception type of the reference: its message says what is wrong and what to do."""


class CheckpointError(ValueError):
    """A checkpoint, config or input the reference cannot use."""
