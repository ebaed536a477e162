"""verify_function and the checks only a function gets (see README.md in this folder)."""

from ._verify import verify_function

__all__ = ["verify_function"]
