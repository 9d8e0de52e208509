"""Another taxa list or threshold applied to stored classifications, on the CPU.

A classification stores its classifier's full softmax before any list (float16, one value a
label: ForwardOptions.probabilities). Masking renormalises over the kept labels, which is
the same as a softmax over their log-probabilities, and roll-up only sums: so the answer of
any list and threshold follows from the stored vector through the same Rollup the forward
runs, exact to float16's rounding of each probability (a relative 2^-11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from inference.rollup import SOURCES, Rollup
from inference.taxonomy import AnswerPolicy

CPU = torch.device("cpu")
# 0 is log'ed to a finite floor so a row whose kept labels all rounded to 0 in float16 still
# renormalises (to equal shares) instead of to NaN.
FLOOR = 1e-30


@dataclass(frozen=True)
class Answer:
    label: str
    score: float
    rank: str | None
    source: str
    topk: list[tuple[str, float]]


class Reapplier:
    """One policy over one classifier's labels; call it with batches of stored vectors."""

    def __init__(self, policy: AnswerPolicy, labels: Sequence[str], top_k: int) -> None:
        self.labels = list(labels)
        self.rollup = Rollup(policy, labels, CPU)
        self.k = min(top_k, self.rollup.kept, len(labels))

    def __call__(self, stored: Sequence[bytes]) -> list[Answer]:
        raw = np.frombuffer(b"".join(stored), dtype=np.float16).reshape(len(stored), -1)
        probs = torch.from_numpy(raw.astype(np.float32))
        with torch.inference_mode():
            masked = self.rollup.mask(probs.clamp_min(FLOOR).log()).softmax(dim=1)
            values, indices = masked.topk(self.k, dim=1)
            answers = self.rollup.answer(masked)
        out = []
        for (node, score, source), vs, ix in zip(
            answers.tolist(), values.tolist(), indices.tolist(), strict=True
        ):
            out.append(Answer(
                self.rollup.names[int(node)], score, self.rollup.ranks[int(node)],
                SOURCES[int(source)], [(self.labels[i], v) for i, v in zip(ix, vs, strict=True)],
            ))
        return out
