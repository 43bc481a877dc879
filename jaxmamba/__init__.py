"""jaxmamba: Mamba-based brain-tumour segmentation in JAX/Flax."""

__version__ = "0.1.0"
