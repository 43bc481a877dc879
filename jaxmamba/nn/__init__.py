"""Layers: mamba_ssm's simple `Mamba` as a Flax module (`from jaxmamba.nn import Mamba`)."""
from jaxmamba.nn.mamba import Mamba

__all__ = ["Mamba"]
