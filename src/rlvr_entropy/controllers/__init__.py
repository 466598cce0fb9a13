"""Stateful pieces of methods (anchors, adaptive coefficients). Each has state_dict()/load_state_dict() and is
saved with checkpoints by the engines through ``Method.state_dict()``."""
from rlvr_entropy.controllers.anchor import Anchor
from rlvr_entropy.controllers.adaptive import AdaptiveCoefficient
from rlvr_entropy.controllers.band import BandState
from rlvr_entropy.controllers.entropic import EntroPICController
from rlvr_entropy.controllers.lagged import LaggedValue

__all__ = ["Anchor", "AdaptiveCoefficient", "BandState", "EntroPICController", "LaggedValue"]
