"""jaxmamba.huge_pages: when an entry point re-executes itself with glibc's hugetlb tunable, that
the new process gets the same command line and the tunable, and that XLA's per-step buffers then
stop faulting in 4 KB pages."""
import os
import subprocess
import sys
import textwrap

import pytest

from jaxmamba import huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**changes):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
  env.update(changes)
  return env


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert huge_pages.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert huge_pages.thp_mode(str(path)) == "always"
  assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


def test_opt_out_and_an_existing_tunable_leave_the_process_alone():
  assert huge_pages.why_not({huge_pages.OPT_OUT: "0"}) == f"{huge_pages.OPT_OUT}=0"
  reason = huge_pages.why_not({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert "already" in reason


def test_environment_keeps_the_users_tunables():
  env = huge_pages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + huge_pages.TUNABLE
  assert env["A"] == "b"
  assert huge_pages.environment({})["GLIBC_TUNABLES"] == huge_pages.TUNABLE


_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    print("start", os.getpid(), flush=True)
    from jaxmamba import huge_pages
    huge_pages.reexec()
    print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
""")


def test_reexec_runs_the_same_command_with_the_tunable(tmp_path):
  reason = huge_pages.why_not(_env())
  if reason is not None:
    pytest.skip(f"huge pages do not apply here: {reason}")
  script = tmp_path / "entry.py"
  script.write_text(_SCRIPT.format(root=ROOT))
  out = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=_env(),
                       capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
  starts = [line for line in out if line.startswith("start")]
  afters = [line for line in out if line.startswith("after")]
  # started twice (the second time with the tunable), same process, same arguments, once only
  assert len(starts) == 2 and len(afters) == 1, out
  assert starts[0].split()[1] == starts[1].split()[1] == afters[0].split()[1]
  assert huge_pages.TUNABLE in afters[0] and "['--flag', 'a b']" in afters[0]

  opted_out = subprocess.run([sys.executable, str(script)], env=_env(**{huge_pages.OPT_OUT: "0"}),
                             capture_output=True, text=True, timeout=60, check=True).stdout
  assert opted_out.count("start") == 1 and "after" in opted_out and "None" in opted_out


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


def test_huge_pages_cut_xlas_page_faults(tmp_path):
  reason = huge_pages.why_not(_env())
  if reason is not None:
    pytest.skip(f"huge pages do not apply here: {reason}")
  script = tmp_path / "faults.py"
  script.write_text(_FAULTS.format(root=ROOT))

  def faults(**env):
    out = subprocess.run([sys.executable, str(script)], env=_env(**env), capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return int(out.split()[-1])

  plain = faults()
  huge = faults(GLIBC_TUNABLES=huge_pages.TUNABLE)
  assert plain > 15_000, plain            # 4 KB faults: a 64 MB buffer is 16,384 pages
  assert huge < plain / 4, (huge, plain)
