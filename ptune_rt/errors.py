"""Errors ptune-rt raises by name."""


class AdapterError(ValueError):
    """An adapter checkpoint cannot be saved or loaded. The message names the file, key or
    argument at fault and what was expected; the model has not been changed."""
