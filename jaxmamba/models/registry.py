"""One table of every model of Table I: where its code lives and its pinned parameter count.

Model modules are imported lazily so that `names()` is cheap and one broken model cannot stop the
others from building.  Each model module provides:

* a Flax linen Module class named by `ModelEntry.factory`, built as `cls(**entry.kwargs, **overrides)`,
  called as `module(x, train: bool)` on NHWC float32 input in [0, 1] (BGR, as the authors read it),
  returning full-resolution logits (batch, H, W, 1);
* `from_torch_state_dict(state_dict, **entry.kwargs) -> dict` turning a state_dict with the
  authors' key names (numpy arrays or torch tensors) into Flax variables
  (`{"params": ..., "batch_stats": ...}`), checking every key and shape.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  name: str
  module: str            # python module holding the class and the torch converter
  factory: str           # class name inside `module`
  paper_params: int      # Table I's parameter count, pinned by tests
  family: str            # "cnn", "transformer", "umamba" or "ultralight"
  kwargs: tuple = ()     # fixed constructor arguments, as (key, value) pairs

  @property
  def fixed_kwargs(self) -> dict[str, Any]:
    return dict(self.kwargs)


def _ul(name: str, variant: str, params: int) -> ModelEntry:
  return ModelEntry(name, "jaxmamba.models.ultralight", "UltraLightVMUNet", params, "ultralight",
                    (("variant", variant),))


_ENTRIES = (
    ModelEntry("unet", "jaxmamba.models.unet", "UNet", 7_765_985, "cnn"),
    ModelEntry("resnet18_seg", "jaxmamba.models.resnet_seg", "ResNetSeg", 13_930_497, "cnn",
               (("depth", 18),)),
    ModelEntry("resnet50_seg", "jaxmamba.models.resnet_seg", "ResNetSeg", 42_909_633, "cnn",
               (("depth", 50),)),
    ModelEntry("segformer", "jaxmamba.models.segformer", "SegFormer", 17_782_913, "transformer"),
    ModelEntry("umambabot", "jaxmamba.models.umamba", "UMambaBot", 9_813_700, "umamba",
               (("pyramid_pooling", False),)),
    ModelEntry("umambabot_pp", "jaxmamba.models.umamba", "UMambaBot", 10_076_356, "umamba",
               (("pyramid_pooling", True),)),
    _ul("ulvmunet", "base", 49_457),
    _ul("ulvmunet_v1", "v1", 217_165),
    _ul("ulvmunet_v2", "v2", 42_737),
    _ul("ulvmunet_v3", "v3", 176_453),
    _ul("ulvmunet_v4", "v4", 1_135_309),
    _ul("ulvmunet_v5", "v5", 703_885),
    _ul("ulvmunet_v6", "v6", 769_677),
)
_BY_NAME = {e.name: e for e in _ENTRIES}


def names() -> list[str]:
  """Every model of Table I, in the table's order."""
  return [e.name for e in _ENTRIES]


def entry(name: str) -> ModelEntry:
  try:
    return _BY_NAME[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}") from None


def _module(name: str):
  return importlib.import_module(entry(name).module)


def build(name: str, **overrides) -> nn.Module:
  """Builds model `name`; overrides (e.g. scan_impl="chunked", dtype=jnp.bfloat16) go to its constructor."""
  e = entry(name)
  cls = getattr(_module(name), e.factory)
  return cls(**e.fixed_kwargs, **overrides)


def from_torch_state_dict(name: str, state_dict) -> dict:
  """Flax variables for model `name` from a PyTorch state_dict with the authors' key names."""
  e = entry(name)
  state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
  return _module(name).from_torch_state_dict(state_dict, **e.fixed_kwargs)
