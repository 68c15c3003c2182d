"""Find, measure and use the Assistant Axis of a chat model.

The workflow (see the repository's Snakefile) calls into these modules, one per concept:
roles, models, chat, backends, activations, judge, axis.
"""

from assistant_axis.errors import AxisError, InputError

__all__ = ["AxisError", "InputError"]
__version__ = "0.1.0"
