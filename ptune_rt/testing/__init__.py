"""Numerical-equality rules shared by the test suite and ``ptune-rt check``."""
from .tolerances import TOLERANCES, assert_close_to_reference, error_report

__all__ = ["TOLERANCES", "assert_close_to_reference", "error_report"]
