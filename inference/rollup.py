"""A taxa list and a taxonomy applied to a batch of classifier outputs, on their device.

The list masks the logits (a removed label's probability is exactly 0 and the kept ones are
renormalised, as a softmax over the kept labels alone). When the best label scores below the
threshold, the full softmax is summed up the taxonomy and the answer is the best taxon of
the lowest rank whose sum reaches it. Sums come from one cumulative sum: the labels are put
in the order of a depth-first walk of the taxonomy, where every taxon's labels lie side by
side, so a taxon's score is a difference of two entries. That is O(labels) memory for any
head (a label x taxon matrix of a 29,000-species head is GBs), deterministic (no atomics),
and summed in float64 so the difference loses nothing that float32 would show.

Everything is tensor ops on the batch: no value is read back, so the forward's host syncs
stay what they were. Ties go to the taxon first in order: labels in the classifier's order,
then the higher taxa in the taxonomy file's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from inference.taxonomy import AnswerPolicy, Taxonomy

# prediction_source, by code: 2 x masked + rolled up
SOURCES = ("classifier", "rolled-up", "masked", "masked-and-rolled-up")


class Rollup:
    def __init__(self, policy: AnswerPolicy, labels: Sequence[str], device: torch.device) -> None:
        self.policy = policy
        self.threshold = float(policy.threshold)
        kept = set(policy.taxa) if policy.taxa is not None else set(labels)
        self.masked = len(kept) < len(labels)
        self.kept = sum(label in kept for label in labels)
        self.keep = torch.tensor([label in kept for label in labels], device=device)
        taxonomy = policy.taxonomy
        self.names: list[str] = list(labels)
        self.ranks: list[str | None] = [None] * len(labels)
        self.tree: _Tree | None = None
        if taxonomy is not None:
            self.tree = _Tree(taxonomy, labels, device)
            self.names = self.tree.names
            self.ranks = self.tree.ranks

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits whose softmax is the renormalised one over the kept labels."""
        if not self.masked:
            return logits
        return logits.masked_fill(~self.keep, float("-inf"))

    def answer(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, L) probabilities (masked already) -> (B, 3): taxon index into `names`, its
        score, its prediction_source code; float32, for the forward's one host copy."""
        top_i = probs.argmax(dim=1)  # the first of equal maxima
        top_p = probs.gather(1, top_i[:, None])[:, 0]
        node, score = top_i, top_p
        rolled = torch.zeros_like(top_i, dtype=torch.bool)
        if self.tree is not None:
            best, best_node = self.tree.best_per_rank(probs)
            reached = best >= self.threshold
            # the lowest rank that reaches it; none does: the highest rank, best below it
            last = torch.full_like(top_i, best.shape[1] - 1)
            level = torch.where(reached.any(dim=1), reached.float().argmax(dim=1), last)
            confident = top_p >= self.threshold
            walked = best_node.gather(1, level[:, None])[:, 0]
            node = torch.where(confident, top_i, walked)
            score = torch.where(confident, top_p, best.gather(1, level[:, None])[:, 0])
            rolled = node != top_i
        code = rolled.long() + (2 if self.masked else 0)
        return torch.stack([node.float(), score.float(), code.float()], dim=1)


class _Tree:
    """The taxonomy as index tensors: labels in depth-first order, each taxon's span of
    them, and each taxon's rank as a level (0: the lowest rank present)."""

    def __init__(self, taxonomy: Taxonomy, labels: Sequence[str], device: torch.device) -> None:
        label_set = set(labels)
        self.names = [*labels, *(t.name for t in taxonomy.taxa if t.name not in label_set)]
        by_name = taxonomy.by_name()
        self.ranks: list[str | None] = [by_name[n].rank for n in self.names]
        children: dict[str | None, list[str]] = {}
        for name in self.names:  # labels first, in their order, then the file's
            children.setdefault(by_name[name].parent, []).append(name)
        position = {label: i for i, label in enumerate(labels)}
        order: list[int] = []
        spans: dict[str, tuple[int, int]] = {}

        def walk(name: str) -> None:
            start = len(order)
            if name in position:
                order.append(position[name])
            for child in children.get(name, []):
                walk(child)
            spans[name] = (start, len(order))

        for root in children.get(None, []):
            walk(root)
        # labels already in depth-first order (a label file sorted by taxonomy) skip the copy
        self.order = None if order == sorted(order) else torch.tensor(order, device=device)
        self.starts = torch.tensor([spans[n][0] for n in self.names], device=device)
        self.ends = torch.tensor([spans[n][1] for n in self.names], device=device)
        ranks = taxonomy.ranks()
        self.levels = len(ranks)
        self.level = torch.tensor([ranks.index(r) for r in self.ranks], device=device)  # (N,)
        self.index = torch.arange(len(self.names), device=device)

    def best_per_rank(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) the best summed score of each rank, and (B, K) which taxon has it: the
        maximum of each rank by a scatter, then the first taxon holding it by another, so
        memory stays (taxa, B) however unequal the ranks' sizes. Taxa run down the rows:
        picking whole rows is a copy of contiguous memory, several times faster on a CPU."""
        b, n = probs.shape[0], len(self.names)
        columns = probs.double().t().contiguous()  # (L, B)
        if self.order is not None:
            columns = columns.index_select(0, self.order)
        cumulative = torch.cat([columns.new_zeros((1, b)), columns.cumsum(dim=0)], dim=0)
        sums = (cumulative.index_select(0, self.ends)
                - cumulative.index_select(0, self.starts)).float()  # (N, B)
        level = self.level[:, None].expand(n, b)
        best = sums.new_full((self.levels, b), -1.0).scatter_reduce(0, level, sums, "amax")
        holder = torch.where(sums == best.gather(0, level), self.index[:, None].expand(n, b), n)
        first = holder.new_full((self.levels, b), n).scatter_reduce(0, level, holder, "amin")
        return best.t(), first.t()
