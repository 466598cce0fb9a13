"""rlvr-entropy: entropy control for RL with verifiable rewards.

Core (this package, ``core``, ``methods``, ``controllers``, ``stats``) imports only torch.
"""
from rlvr_entropy import stats
from rlvr_entropy.core.batch import LossOutput, TokenBatch
from rlvr_entropy.methods import Method, available_methods, get_method_class, make_method, register_method

__version__ = "0.1.0"
__all__ = ["TokenBatch", "LossOutput", "Method", "available_methods", "make_method", "get_method_class",
           "register_method", "stats", "__version__"]
