"""Where the tests find the real LGG subset (21 patients of kaggle_3m), kept outside the repository.

`<repo>/../shared/data/lgg_subset` (the layout CI checks out), or `$JAXMAMBA_LGG_DIR`.  Tests that
need it call `lgg_dir()`: it skips them where the subset is absent, except under `CI=true`, where
a missing subset fails them, so that the real-data tests can never silently drop out of CI.
"""
from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LGG_DIR = os.path.join(REPO, "..", "shared", "data", "lgg_subset")


def lgg_path() -> str:
  """The subset's path (it may not exist)."""
  return os.path.abspath(os.environ.get("JAXMAMBA_LGG_DIR") or DEFAULT_LGG_DIR)


def in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def lgg_dir() -> str:
  """The subset's path; skips the calling test if it is absent (fails instead under CI=true)."""
  path = lgg_path()
  if not os.path.isdir(path):
    message = (f"LGG subset not found at {path} (lay it out at <repo>/../shared/data/lgg_subset "
               "or set JAXMAMBA_LGG_DIR to a kaggle_3m folder)")
    if in_ci():
      pytest.fail(message + "; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)
  return path
