"""Runtime: the contracts between components and the engine that runs the step loop."""

from .components import default_components
from .contracts import RunResult, RuntimeComponents, RuntimeContext
from .engine import RuntimeEngine

__all__ = ["RunResult", "RuntimeComponents", "RuntimeContext", "RuntimeEngine", "default_components"]
