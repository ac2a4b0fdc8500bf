"""One exception type for bad user input, so callers (CLI, flows) can tell it from a bug."""


class LayerMoEError(ValueError):
    """Bad input to layermoe. The message names the offending value and how to fix it."""
