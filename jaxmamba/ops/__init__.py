"""The selective scan: `from jaxmamba.ops import selective_scan` is the function.

The function shadows its module's name in this package, so code that needs the module itself
(its IMPLS, check_args) takes it with `importlib.import_module("jaxmamba.ops.selective_scan")`.
"""
from jaxmamba.ops.selective_scan import selective_scan

__all__ = ["selective_scan"]
