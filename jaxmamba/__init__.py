"""jaxmamba: Mamba-based brain-tumour segmentation in JAX/Flax."""

from jaxmamba import xla_flags as _xla_flags

__version__ = "0.1.0"

_xla_flags.apply()
