"""`CheckpointError`: the one error type of the checkpoint loader (a ValueError whose message
names the offending file or tensor)."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""
