"""The C allocator behind XLA:CPU's buffers: tcmalloc where the system has it, else glibc with
transparent huge pages (Linux).  Set by re-executing an entry point once.

XLA:CPU allocates each execution's buffers afresh (ResNet18-seg's train step at batch 4, 256 px:
one 258 MB temporary block and nine of ~36 MB), and glibc maps every block above 32 MB from the
kernel and unmaps it on free.  So every step the kernel faults the pages in again, 4 KB at a
time, and zeroes them: 66,000 page faults and ~150 ms of system time a ResNet18-seg step on a
2-core x86-64 machine (kernels/NOTES.md, "Host memory").  Two cures, measured there:

- tcmalloc (`LD_PRELOAD`, Debian's libtcmalloc-minimal4) keeps freed blocks for the next step:
  no faults, no system time, the same step time every step (ResNet18-seg 346-395 ms, SegFormer
  725-738 ms).  PyTorch's CPU performance guide recommends it (or jemalloc) for the same reason.
- glibc's tunable `glibc.malloc.hugetlb=1` asks for transparent 2 MB pages for what it maps:
  512x fewer faults (ResNet18-seg 366-400 -> 303-327 ms), but the kernel still zeroes the pages
  each step and, once physical memory is fragmented, compacts it: steps of 500-780 ms with
  340-490 ms of system time on a machine where another process held memory.

Both are read once, at start-up: a running process can't switch.  `reexec()`, called first by
the `python -m experiments.*` entry points, replaces the process by the same command line with
the allocator set (same process id, open files and working directory).  It does nothing where
that would not help or could not work: not Linux, an allocator already preloaded or the tunable
already set (which also stops a second re-execution), no tcmalloc and no glibc >= 2.35 with
transparent huge pages, or JAXMAMBA_HOST_MEMORY=0 in the environment.  Library users can set
either themselves (`LD_PRELOAD=libtcmalloc_minimal.so.4 python ...`).
"""
from __future__ import annotations

import ctypes.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXMAMBA_HOST_MEMORY"       # "0": keep the process as it was started
_PRELOADED = ("tcmalloc", "jemalloc", "mimalloc")
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, ...] | None:
  """(major, minor) of the C library this process runs on, None if it is not glibc."""
  try:
    name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  try:
    return tuple(int(p) for p in version.split(".")[:2])
  except ValueError:
    return None


def thp_mode(path: str = _THP_MODE) -> str | None:
  """The kernel's transparent huge page mode (`always`, `madvise` or `never`), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def find_tcmalloc() -> str | None:
  """tcmalloc's shared library name as the dynamic linker finds it, None if absent."""
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def huge_pages_unavailable() -> str | None:
  """Why glibc's transparent huge pages can't be had here (None: they can)."""
  version = glibc_version()
  if version is None or version < (2, 35):
    return "huge pages need glibc >= 2.35"
  mode = thp_mode()
  if mode in (None, "never"):
    return f"the kernel's transparent huge pages are {mode or 'unavailable'}"
  return None


def plan(environ=None) -> tuple[dict, str]:
  """(environment variables to set, why): empty where `reexec()` would leave the process alone."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1") == "0":
    return {}, f"{OPT_OUT}=0"
  preload = environ.get("LD_PRELOAD", "")
  if any(name in preload for name in _PRELOADED):
    return {}, f"an allocator is already preloaded ({preload})"
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return {}, "GLIBC_TUNABLES already sets glibc.malloc.hugetlb"
  if not sys.platform.startswith("linux"):
    return {}, f"not Linux ({sys.platform})"
  tcmalloc = find_tcmalloc()
  if tcmalloc:
    return {"LD_PRELOAD": f"{preload}:{tcmalloc}" if preload else tcmalloc}, f"{tcmalloc} found"
  unavailable = huge_pages_unavailable()
  if unavailable:
    return {}, f"no tcmalloc, and {unavailable}"
  tunables = environ.get("GLIBC_TUNABLES", "")
  return ({"GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE},
          f"no tcmalloc; transparent huge pages are {thp_mode()}")


def describe(environ=None) -> str:
  """The allocator settings of this process, for a benchmark's footer."""
  environ = os.environ if environ is None else environ
  return (f"LD_PRELOAD={environ.get('LD_PRELOAD', '')!r}, "
          f"GLIBC_TUNABLES={environ.get('GLIBC_TUNABLES', '')!r}")


def reexec() -> None:
  """Re-executes this command line with the allocator of `plan()`, if it names one.

  Call it before any work: nothing after the call survives in the replaced process.  Returns
  (without re-executing) where the plan is empty or the exec fails.
  """
  changes, _ = plan()
  if not changes:
    return
  argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, {**os.environ, **changes})
  except OSError:
    return
