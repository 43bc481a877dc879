"""jaxmamba.host_memory: which allocator an entry point re-executes itself with, that the new
process gets the same command line and the allocator, and that XLA's per-step buffers then stop
faulting in 4 KB pages."""
import os
import subprocess
import sys
import textwrap

import pytest

from jaxmamba import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ALLOCATOR_VARS = ("GLIBC_TUNABLES", "LD_PRELOAD", host_memory.OPT_OUT)


def _env(**changes):
  env = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_VARS}
  env.update(changes)
  return env


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_memory.thp_mode(str(path)) == "always"
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_opt_out_and_a_chosen_allocator_leave_the_process_alone():
  assert host_memory.plan({host_memory.OPT_OUT: "0"}) == ({}, f"{host_memory.OPT_OUT}=0")
  changes, why = host_memory.plan({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert changes == {} and "already" in why
  changes, why = host_memory.plan({"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"})
  assert changes == {} and "already preloaded" in why


def test_plan_prefers_tcmalloc_then_huge_pages(monkeypatch):
  if not sys.platform.startswith("linux"):
    pytest.skip("Linux only")
  monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
  changes, _ = host_memory.plan({"LD_PRELOAD": "libfoo.so"})
  assert changes == {"LD_PRELOAD": "libfoo.so:libtcmalloc_minimal.so.4"}
  monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: None)
  monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
  changes, _ = host_memory.plan({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert changes == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + host_memory.TUNABLE}
  monkeypatch.setattr(host_memory, "thp_mode", lambda: "never")
  assert host_memory.plan({})[0] == {}
  monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
  monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 31))
  assert host_memory.plan({})[0] == {}


_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    print("start", os.getpid(), flush=True)
    from jaxmamba import host_memory
    host_memory.reexec()
    print("after", os.getpid(), host_memory.describe(), sys.argv[1:], flush=True)
""")


def test_reexec_runs_the_same_command_with_the_allocator(tmp_path):
  changes, why = host_memory.plan(_env())
  if not changes:
    pytest.skip(f"no allocator to set here: {why}")
  script = tmp_path / "entry.py"
  script.write_text(_SCRIPT.format(root=ROOT))
  out = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=_env(),
                       capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
  starts = [line for line in out if line.startswith("start")]
  afters = [line for line in out if line.startswith("after")]
  # started twice (the second time with the allocator), same process, same arguments, once only
  assert len(starts) == 2 and len(afters) == 1, out
  assert starts[0].split()[1] == starts[1].split()[1] == afters[0].split()[1]
  assert all(value in afters[0] for value in changes.values()) and "['--flag', 'a b']" in afters[0]

  opted_out = subprocess.run([sys.executable, str(script)],
                             env=_env(**{host_memory.OPT_OUT: "0"}), capture_output=True,
                             text=True, timeout=60, check=True).stdout
  assert opted_out.count("start") == 1 and "LD_PRELOAD='', GLIBC_TUNABLES=''" in opted_out


_FAULTS = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    import jaxmamba, jax, jax.numpy as jnp
    # a 64 MB result each call, dropped after it: glibc maps it afresh each time (above its
    # 32 MB threshold for mapping) and unmaps it on free
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.ones((16 * 2**20,), jnp.float32)
    for _ in range(2):
      f(x).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
      f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 3)
""")


def _candidates():
  """Each allocator setting this machine supports (tcmalloc, huge pages), whichever plan() picks."""
  found = []
  if sys.platform.startswith("linux") and host_memory.find_tcmalloc():
    found.append({"LD_PRELOAD": host_memory.find_tcmalloc()})
  if host_memory.huge_pages_unavailable() is None:
    found.append({"GLIBC_TUNABLES": host_memory.TUNABLE})
  return found


@pytest.mark.parametrize("kind", ["LD_PRELOAD", "GLIBC_TUNABLES"])
def test_each_allocator_cuts_xlas_page_faults(tmp_path, kind):
  settings = [c for c in _candidates() if kind in c]
  if not settings:
    pytest.skip(f"{kind}: not available on this machine")
  script = tmp_path / "faults.py"
  script.write_text(_FAULTS.format(root=ROOT))

  def faults(**env):
    out = subprocess.run([sys.executable, str(script)], env=_env(**env), capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return int(out.split()[-1])

  plain = faults()
  chosen = faults(**settings[0])
  assert plain > 15_000, plain            # 4 KB faults: a 64 MB buffer is 16,384 pages
  # tcmalloc keeps the block (now and then it returns a free one: 1 call in 3 refaulted once);
  # huge pages fault 2 MB at a time where the kernel finds
  # free 2 MB pages, and fall back to 4 KB where physical memory is fragmented
  assert chosen < (plain / 2 if kind == "LD_PRELOAD" else plain * 0.9), (chosen, plain)
