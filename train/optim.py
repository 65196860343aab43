"""AdamW with warmup + cosine decay, global-norm clipping, and weight decay on matrices only."""
import jax
import optax

from .config import OptimConfig


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to lr, then cosine decay to min_lr at the last step. The first step
    already moves (lr / (warmup + 1), as nanoGPT does): a zero learning rate wastes it."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / (warmup + 1), peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.min_lr)


def is_matrix(axes: tuple) -> bool:
    """A weight matrix maps to or from the embedding: an `embed` axis and at least one more
    besides the stacked `layers` axis. Norm scales ([L, D]) and biases (per-head [L, N, H]
    included) fail that test, so they are never decayed."""
    others = [a for a in axes if a != "layers"]
    return "embed" in others and len(others) >= 2


def decay_mask(axes_tree: dict) -> dict:
    """True for the parameters weight decay applies to, from their logical axes."""
    return jax.tree.map(is_matrix, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(cfg: OptimConfig, total_steps: int, axes_tree: dict):
    """The optax transformation for a parameter tree whose logical axes are `axes_tree`."""
    adamw = optax.adamw(learning_rate(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2,
                        weight_decay=cfg.weight_decay, mask=decay_mask(axes_tree))
    # Always the same chain (clip at infinity when off): the optimizer state keeps one
    # structure, so a run resumes whatever grad_clip it is given.
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip or float("inf")), adamw)
