"""Logical names for activations, as the parameters have. A no-op unless a sharding layer is
tracing the model under logical-axis rules and a mesh (see headwise.parallel.under_rules): the model
names what an axis IS, never which devices it goes to."""
from flax.linen import with_logical_constraint


def constrain(x, axes: tuple):
    """`x` with its dimensions named by `axes` (e.g. ('batch', 'seq', 'embed'))."""
    return with_logical_constraint(x, axes)
