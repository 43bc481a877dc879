"""The real-data tests find the subset relative to the repository and never drop out of CI."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

from tests._data import DEFAULT_LGG_DIR, REPO


def test_default_subset_path_is_relative_to_the_repository():
  assert os.path.abspath(DEFAULT_LGG_DIR) == os.path.abspath(
      os.path.join(REPO, os.pardir, "shared", "data", "lgg_subset"))


def test_no_test_names_an_absolute_machine_path():
  offenders = []
  for path in glob.glob(os.path.join(REPO, "tests", "*.py")):
    if os.path.basename(path) == os.path.basename(__file__):
      continue
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if re.search(r"[\"'](/work|/home|/mnt|/data)/", line):
          offenders.append(f"{os.path.basename(path)}:{number}: {line.strip()}")
  assert not offenders, "\n".join(offenders)


def _pytest_without_subset(ci: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAXMAMBA_LGG_DIR=os.path.join(REPO, "no", "such", "subset"), CI=ci)
  test = "tests/test_data_lgg.py::test_counts"
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                         test], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_subset_skips_locally_and_fails_under_ci():
  local = _pytest_without_subset("")
  assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout[-2000:]
  ci = _pytest_without_subset("true")
  assert ci.returncode != 0, ci.stdout[-2000:]
  assert "LGG subset not found" in ci.stdout and "CI=true" in ci.stdout, ci.stdout[-2000:]
