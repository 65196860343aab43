"""What the explanation shows, runnable: every head's pattern and change, lenses and pictures."""
from .cache import run_with_cache
from .read import head_scores, logit_contributions, logit_lens, rank_heads, top_tokens

__all__ = ["run_with_cache", "logit_lens", "top_tokens", "logit_contributions", "head_scores",
           "rank_heads"]
