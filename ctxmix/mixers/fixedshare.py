"""Fixed-share Hedge (Herbster & Warmuth, "Tracking the best expert"): Hedge for switching sources.

After each Hedge update (w_k *= p_k(target)^eta, normalized) a share ``alpha`` of the total weight is
spread evenly back over all experts: w_k <- (1 - alpha) w_k + alpha / K. No weight ever falls below
alpha / K, so an expert that lost for a long stretch can take over within a few tokens once it starts
predicting better. alpha = 0 is plain Hedge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import CtxmixError
from .hedge import ShareMixer, check_eta

# Defaults measured with unigram + ngram experts on alice29.txt, lcet10.txt, enwik8.first1MB and 1M FineWeb
# val tokens: eta 0.1..0.2 with alpha 0.01..0.02 were best on all four (within 0.001 bpb of each other),
# 0.003-0.008 bpb below Hedge. eta = 1 gained at most 0.0002 over Hedge (alpha <= 0.002) and lost at
# alpha = 0.01; alpha = 0.05 and up lost 0.005-0.01 on lcet10.txt and enwik8.first1MB.
DEFAULT_ETA = 0.15
DEFAULT_ALPHA = 0.02


@dataclass(frozen=True)
class FixedShareOptions:
    # learning rate of the Hedge step
    eta: float = field(default=DEFAULT_ETA, metadata={"help": "learning rate (> 0); 1 = Bayesian mixture", "min": 0.0})
    # share of the weight mixed back uniformly after each token
    alpha: float = field(default=DEFAULT_ALPHA, metadata={"help": "share mixed back uniformly per token (0 = Hedge)", "min": 0.0, "max": 1.0})

    def __post_init__(self) -> None:
        check_eta(self.eta)
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise CtxmixError(f"alpha must be in [0, 1], got {self.alpha}")


class FixedShareMixer(ShareMixer):
    """Hedge, then mix ``alpha`` of the uniform weight back in after every token."""

    Options = FixedShareOptions

    def __init__(self, options: FixedShareOptions | None, *, experts):
        options = options or FixedShareOptions()
        self._alpha = options.alpha
        super().__init__(options, experts=experts)
