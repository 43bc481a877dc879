"""Converts the authors' PyTorch weights into a jaxmamba checkpoint.

  python -m jaxmamba.convert --model NAME --torch-checkpoint FILE.pth --workdir DIR [--overwrite]
  python -m jaxmamba.convert --model resnet18_seg --torchvision-encoder resnet18.pth --workdir DIR

The second form starts a ResNet-seg model the way the authors did: the encoder from torchvision's
ImageNet weights (a local `resnet18-f37072fd.pth` / `resnet50-0676ba61.pth`, i.e. IMAGENET1K_V1,
with torchvision's own keys; nothing is downloaded), the decoder freshly initialised (seed
`--seed`).  Train from it with `--config.init_from=DIR`.

FILE.pth holds a state_dict with the authors' key names (as saved by `torch.save(model.state_dict())`),
optionally with DataParallel's `module.` prefix, or a dict wrapping it under "state_dict" or "model".
Every key must be used and every shape must match the model (errors name the key).  DIR receives
`model.json` + an Orbax checkpoint (see jaxmamba.checkpoint_io) that prediction, evaluation and
training read.  Needs torch (only to unpickle the file).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba import checkpoint_io
from jaxmamba.models import registry
from jaxmamba.nn import torch_compat

_WRAPPER_KEYS = ("state_dict", "model")
# Input size for the abstract init that gives the expected variable shapes (parameters do not depend
# on it; 64 is allowed by every model).
_PROBE_SIZE = 64


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
  """The state_dict inside a loaded .pth: the dict itself or its "state_dict"/"model" entry."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
  for key in _WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      return dict(obj[key])
  if any(isinstance(v, Mapping) for v in obj.values()):
    raise ValueError("checkpoint is a dict of dicts without a 'state_dict' or 'model' entry; "
                     f"top-level keys: {sorted(obj)[:10]}")
  return dict(obj)


def load_torch_file(path: str) -> dict[str, np.ndarray]:
  """Reads a .pth state_dict into numpy arrays (tensors only; no code is unpickled)."""
  try:
    import torch  # noqa: PLC0415 (torch is only needed here)
  except ImportError as e:
    raise RuntimeError("reading .pth files needs torch (pip install torch --index-url "
                       "https://download.pytorch.org/whl/cpu)") from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt or non-weights pickles
    raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from e
  return {k: torch_compat.to_numpy(v) for k, v in unwrap_state_dict(obj).items()}


def expected_variables(model_name: str):
  """Abstract shapes of the model's variables (no compute)."""
  model = registry.build(model_name)
  x = jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.PRNGKey(0), x)


def convert_state_dict(model_name: str, state_dict: Mapping[str, Any]) -> dict:
  """Flax variables of `model_name` from a state_dict, checked against the model's own init."""
  variables = registry.from_torch_state_dict(model_name, dict(state_dict))
  expected = {k: v for k, v in expected_variables(model_name).items()
              if k in checkpoint_io.COLLECTIONS}
  got = {k: v for k, v in variables.items() if jax.tree.leaves(v)}
  expected = {k: v for k, v in expected.items() if jax.tree.leaves(v)}
  torch_compat.check_variables_match(expected, got, what=f"{model_name} variables")
  return got


def convert(model_name: str, torch_checkpoint: str, workdir: str, overwrite: bool = False) -> str:
  registry.entry(model_name)  # unknown names fail before the file is read
  sd = load_torch_file(torch_checkpoint)
  variables = convert_state_dict(model_name, sd)
  return checkpoint_io.save_variables(
      workdir, model_name, variables, overwrite=overwrite,
      extra={"source": os.path.abspath(torch_checkpoint)})


def convert_torchvision_encoder(model_name: str, torchvision_checkpoint: str, workdir: str,
                                overwrite: bool = False, seed: int = 0) -> str:
  """A ResNet-seg checkpoint: random init, then the encoder from a torchvision state_dict."""
  entry = registry.entry(model_name)
  if entry.module != "jaxmamba.models.resnet_seg":
    raise ValueError(f"--torchvision-encoder is for the ResNet-seg models, not {model_name!r}")
  from jaxmamba.models import resnet_seg  # noqa: PLC0415
  sd = load_torch_file(torchvision_checkpoint)
  model = registry.build(model_name)
  x = jnp.zeros((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(seed))
  variables = resnet_seg.load_torchvision_encoder(
      jax.tree.map(np.asarray, dict(variables)), sd, entry.fixed_kwargs["depth"])
  return checkpoint_io.save_variables(
      workdir, model_name, variables, overwrite=overwrite,
      extra={"source": os.path.abspath(torchvision_checkpoint), "encoder_only": True,
             "decoder_seed": seed})


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxmamba.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="registry name, e.g. umambabot_pp")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--torch-checkpoint", help="the authors' .pth state_dict")
  source.add_argument("--torchvision-encoder",
                      help="a torchvision resnet18/50 .pth: encoder only (ResNet-seg models)")
  parser.add_argument("--workdir", required=True, help="output directory")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
  parser.add_argument("--seed", type=int, default=0, help="decoder init with --torchvision-encoder")
  args = parser.parse_args(argv)
  try:
    if args.torchvision_encoder:
      out = convert_torchvision_encoder(args.model, args.torchvision_encoder, args.workdir,
                                        args.overwrite, args.seed)
    else:
      out = convert(args.model, args.torch_checkpoint, args.workdir, args.overwrite)
  except (ValueError, KeyError, OSError, RuntimeError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"convert: error: {msg}", file=sys.stderr)
    return 1
  print(f"wrote {args.model} checkpoint to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
