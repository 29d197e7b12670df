"""A third-party expert and mixer, as a package outside ctxmix would ship them (registered by the entry
points in ``ctxmix_demo_plugin-0.1.0.dist-info/entry_points.txt``; the tests put this folder on the path)."""

from dataclasses import dataclass, field

import numpy as np

from ctxmix.experts.base import Expert
from ctxmix.mixers.base import LinearMixer


class BigramExpert(Expert):
    """add-alpha bigram counts: p(v | previous token)"""

    @dataclass(frozen=True)
    class Options:
        alpha: float = field(default=0.5, metadata={"help": "pseudo-count of every token", "min": 1e-6})

    def begin(self, tokens):
        self.counts = np.zeros((self.vocab_size + 1, self.vocab_size))  # last row: no previous token yet
        self.previous = self.vocab_size

    def next_distribution(self, want=()):
        row = self.counts[self.previous] + self.options.alpha
        return row / row.sum(), {}

    def observe(self, token):
        self.counts[self.previous, token] += 1
        self.previous = int(token)


class EqualMixer(LinearMixer):
    """the plain average of the experts"""

    def weights(self, logp, features):
        return np.full(logp.shape, 1.0 / logp.shape[1])

    def next_weights(self, features):
        return np.full(len(self.expert_specs), 1.0 / len(self.expert_specs))
