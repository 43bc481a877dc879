"""Model registry: every model of Table I built by name (see registry.py)."""
from jaxmamba.models.registry import ModelEntry, build, entry, from_torch_state_dict, names

__all__ = ["ModelEntry", "build", "entry", "from_torch_state_dict", "names"]
