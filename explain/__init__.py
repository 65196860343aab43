"""What the explanation shows, runnable: every head's pattern and change, lenses and pictures."""
from .cache import run_with_cache

__all__ = ["run_with_cache"]
