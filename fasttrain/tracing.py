"""Named ranges of a training step, as the profiler (and its trace) shows them: ``fasttrain/<part>``.
A few microseconds each when no profiler runs. The bottom layer: losses, methods and models mark their
parts here; ``fasttrain.engine.profiling`` reads them."""
from torch.profiler import record_function

PREFIX = "fasttrain/"


def mark(part: str):
    """The range of one part of the step (``data``, ``forward``, ``loss``, ``gather``, ...)."""
    return record_function(PREFIX + part)
