"""The names the README promises import as what it says they are."""
import inspect


def test_selective_scan_is_the_function():
  from jaxmamba.ops import selective_scan
  assert inspect.isfunction(selective_scan)
  params = list(inspect.signature(selective_scan).parameters)
  assert params[:6] == ["u", "delta", "A", "B", "C", "D"]


def test_mamba_layer_is_the_flax_module():
  import flax.linen as nn

  from jaxmamba.nn import Mamba
  assert issubclass(Mamba, nn.Module)


def test_models_build_by_name():
  from jaxmamba import models
  assert "umambabot_pp" in models.names()
  assert models.build("ulvmunet").__class__.__name__ != ""


def test_triton_dispatch_still_reaches_the_scan_module():
  from jaxmamba.ops import triton_dispatch
  assert callable(triton_dispatch._ss.check_args)
