"""Sharded batches: 8 forced CPU devices in one process, and 2 processes x 4 devices.

Each case runs in a subprocess so that XLA_FLAGS takes effect before jax starts.
"""
import os
import socket
import subprocess
import sys
import textwrap

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ONE_PROCESS = textwrap.dedent("""
  import jax, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxmamba import data
  from jaxmamba.data import synthetic
  assert jax.device_count() == 8, jax.devices()
  s = synthetic.generate(3, 10, 16, seed=2)                     # 30 slices
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  ref = list(data.batches(s, 16, seed=1, epoch=5))
  got = list(data.batches(s, 16, seed=1, epoch=5, sharding=sharding))
  assert len(got) == len(ref) == data.num_batches(s, 16, True) == 1
  for g, r in zip(got, ref):
    for key in ("image", "mask"):
      assert isinstance(g[key], jax.Array) and g[key].sharding == sharding
      assert g[key].dtype == np.uint8 and g[key].shape == r[key].shape
      shards = g[key].addressable_shards
      assert len(shards) == 8 and all(sh.data.shape[0] == 2 for sh in shards)
      for sh in shards:
        np.testing.assert_array_equal(np.asarray(sh.data), r[key][sh.index])
      np.testing.assert_array_equal(np.asarray(g[key]), r[key])
    images, masks = jax.jit(data.to_float)(g)
    assert images.sharding.spec == sharding.spec
  # 30 slices in batches of 16 leave a partial batch of 14: not divisible by 8 devices.
  try:
    list(data.batches(s, 16, drop_remainder=False, sharding=sharding))
  except ValueError as e:
    assert "8 devices" in str(e), e
  else:
    raise AssertionError("no error for a partial batch of 14 over 8 devices")
  # A partial last batch that divides by 8 is yielded as is (24 slices: 16 + 8).
  ok = list(data.batches(s.subset(range(24)), 16, drop_remainder=False, sharding=sharding))
  assert [b["image"].shape[0] for b in ok] == [16, 8]
  print("SHARDING OK")
""")

_MULTI_PROCESS = textwrap.dedent("""
  import sys, jax, numpy as np
  process_id, port = int(sys.argv[1]), sys.argv[2]
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxmamba import data
  from jaxmamba.data import loader, synthetic
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  s = synthetic.generate(2, 12, 16, seed=1)
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  assert loader.process_rows(sharding, (8, 16, 16, 3)) == (4 * process_id, 4 * process_id + 4)
  ref = list(data.batches(s, 8, epoch=3))
  got = list(data.batches(s, 8, epoch=3, sharding=sharding))
  assert len(got) == len(ref) == 3
  for g, r in zip(got, ref):
    assert g["image"].shape == r["image"].shape and not g["image"].is_fully_addressable
    for key in ("image", "mask"):
      for sh in g[key].addressable_shards:
        np.testing.assert_array_equal(np.asarray(sh.data), r[key][sh.index])
  print("PROCESS", process_id, "OK")
""")


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_batches_sharded_over_eight_cpu_devices():
  result = subprocess.run([sys.executable, "-c", _ONE_PROCESS], env=_env(8), cwd=_REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "SHARDING OK" in result.stdout, result.stderr[-3000:]


def _free_port():
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_batches_per_host_share_with_two_processes(tmp_path):
  port = str(_free_port())
  script = tmp_path / "worker.py"
  script.write_text(_MULTI_PROCESS)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], env=_env(4), cwd=_REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (proc, (out, err)) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and f"PROCESS {i} OK" in out, err[-3000:]
