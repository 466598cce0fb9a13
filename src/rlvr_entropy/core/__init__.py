"""Framework-free core: batch record, validation, masked ops, aggregation, PPO surrogate, logits statistics.

Imports only torch.
"""
from rlvr_entropy.core.batch import LossOutput, TokenBatch
from rlvr_entropy.core.aggregation import AGG_MODES, agg_loss, masked_mean

__all__ = ["TokenBatch", "LossOutput", "agg_loss", "masked_mean", "AGG_MODES"]
