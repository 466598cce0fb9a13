"""CE-GPPO (Su et al., "CE-GPPO: Coordinating Entropy via Gradient-Preserving Clipping Policy Optimization in
Reinforcement Learning", arXiv 2509.20712; official code: the loss ``compute_gppo_loss_general_beta`` printed in
github.com/Kwai-Klear/CE-GPPO, README): tokens outside the PPO clip region keep a bounded gradient through a
stop-gradient ratio instead of none.

The paper's token loss (r = pi / pi_old, sg = stop-gradient):

    A < 0 and r < 1 - eps_low   ("NA&LP"):   l = -beta1 (1 - eps_low)  (r / sg(r)) A
    A > 0 and r > 1 + eps_high  ("PA&LP"):   l = -beta2 (1 + eps_high) (r / sg(r)) A
    otherwise:                               l = -r A                 (dual-clipped at -c A for A < 0)

so d l / d log pi = -beta1 (1 - eps_low) A, resp. -beta2 (1 + eps_high) A, out of the region (PPO: 0) and -r A
inside (as PPO). What we compute has exactly these gradients and PPO's clipped value:

    A < 0 and r < 1 - eps_low:    l = -(1 - eps_low)  A (1 + beta1 (r / sg(r) - 1))
    A > 0 and r > 1 + eps_high:   l = -(1 + eps_high) A (1 + beta2 (r / sg(r) - 1))

(r / sg(r) - 1 is 0 in value with gradient d log pi.) beta1 = beta2 = 0 is the PPO/GRPO loss exactly (value and
gradient); beta1 = beta2 = 1 gives the out-of-region tokens the gradient of the unclipped surrogate at the bound.

Defaults: beta1 = 0.5 (the paper's 1.5B recipe; 0.75 for 7B, range 0.5..0.75), beta2 = 1.0, eps_low =
eps_high = 0.2, dual_clip = 3.0 (the official loss always applies verl's clip_ratio_c = 3; None disables).

Deviations from the paper / official code:
- Reported loss value: the out-of-region tokens contribute PPO's clipped value -(1 -/+ eps) A, not the paper's
  -beta (1 -/+ eps) A. Only the value differs (by a constant per token); every gradient is the paper's
  (tests/methods/test_ce_gppo.py compares against the official formula). This makes the logged loss comparable
  with grpo and beta1 = beta2 = 0 exactly grpo.
- The log-ratio is clamped to [-20, 20] before exp (the official loss does not clamp); a token beyond the clamp
  gets no gradient.
- Dual-clip is optional (None disables it); the official loss always applies it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


def ce_gppo_regions(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                    eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high), bool [B, T]: A < 0 and r < 1 - eps_low; A > 0 and r > 1 + eps_high (PPO's clipped tokens)."""
    r = ratio.detach()
    return (advantages < 0) & (r < 1.0 - eps_low), (advantages > 0) & (r > 1.0 + eps_high)


def ce_gppo_token_loss(ratio: torch.Tensor, advantages: torch.Tensor, *, eps_low: float, eps_high: float,
                       beta1: float, beta2: float, dual_clip: float | None = None) -> torch.Tensor:
    """Per-token CE-GPPO loss [B, T] with PPO's clipped value and the paper's gradients (module docstring).

    ratio [B, T] carries the gradient (r = exp(log pi - log pi_old)); advantages [B, T] (0 at padding).
    """
    a = advantages
    low, high = ce_gppo_regions(ratio, a, eps_low, eps_high)
    grad_path = ratio / ratio.detach() - 1.0                                 # value 0, gradient d log pi
    inside = -a * ratio
    if dual_clip is not None:
        inside = torch.where(a < 0, torch.minimum(inside, -a * dual_clip), inside)
    l_low = -(1.0 - eps_low) * a * (1.0 + beta1 * grad_path)
    l_high = -(1.0 + eps_high) * a * (1.0 + beta2 * grad_path)
    return torch.where(low, l_low, torch.where(high, l_high, inside))


@dataclass(frozen=True)
class CEGPPOConfig(PGConfig):
    """CE-GPPO (arXiv 2509.20712)."""

    dual_clip: float | None = 3.0
    """Dual-clip c for A < 0 (arXiv 1912.09729); the CE-GPPO code always applies verl's clip_ratio_c = 3."""
    beta1: float = 0.5
    """beta_1 of arXiv 2509.20712: gradient scale of A < 0 tokens below 1 - eps_low (0.5 for 1.5B, 0.75 for 7B)."""
    beta2: float = 1.0
    """beta_2 of arXiv 2509.20712: gradient scale of A > 0 tokens above 1 + eps_high (1 in both recipes)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("beta1", self.beta1, lo=0.0)
        check_float("beta2", self.beta2, lo=0.0)


@register_method
class CEGPPO(Method):
    name = "ce_gppo"
    Config = CEGPPOConfig
    #: r / sg(r) has value 1 and gradient r / r: finite differences see PPO's flat clipped value where autograd sees
    #: the preserved gradient, by design (tests/methods/test_ce_gppo.py checks the gradient against the paper's).
    smooth_in_inputs = False
    zero_advantage_rows_inert = True  # every token's loss is a multiple of its advantage

    @classmethod
    def neutral_overrides(cls):
        return {"beta1": 0.0, "beta2": 0.0}

    def _loss(self, batch, *, new_step):
        c = self.config
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)                                       # clamped ratio, PPO metrics
        loss_mat = ce_gppo_token_loss(terms.ratio, adv, eps_low=c.eps_low, eps_high=c.eps_high, beta1=c.beta1,
                                      beta2=c.beta2, dual_clip=c.dual_clip)
        loss = self.aggregate(loss_mat, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        with torch.no_grad():
            low, high = ce_gppo_regions(terms.ratio, adv, c.eps_low, c.eps_high)
            metrics.update({"low_frac": masked_mean(low.float(), batch.mask),      # NA&LP: gradient beta1
                            "high_frac": masked_mean(high.float(), batch.mask)})   # PA&LP: gradient beta2
        return loss, metrics
