"""Every entropy intervention, one module each. Importing this package registers them all."""
import importlib
import pkgutil

from rlvr_entropy.methods.base import (
    Method,
    PGConfig,
    available_methods,
    get_method_class,
    make_method,
    register_method,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Method", "PGConfig", "available_methods", "get_method_class", "make_method", "register_method"]
