"""Find, measure and use the Assistant Axis of a chat model.

The workflow (see the repository's Snakefile) calls `stages`, one module per stage, which calls these
modules, one per concept: roles, models, templates, engines (the runtimes: transformers, vLLM, an
OpenAI-compatible server), api, activations, judge, axis, interventions, cap, steer, project, chat,
serve, interop, provenance, analysis, evaluate, capability, sweep, drift, plots. docs/architecture.md
says where a new judge, engine, stage or config key goes.
"""

from assistant_axis.errors import AxisError, InputError

__all__ = ["AxisError", "InputError"]
__version__ = "0.1.0"
