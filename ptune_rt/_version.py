"""The package version (one place: the package, checkpoints and the bench provenance read it)."""
__version__ = "0.1.0"
