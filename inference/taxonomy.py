"""A classifier's labels placed in a taxonomy, and the taxa lists and thresholds applied to it.

The taxonomy is a CSV beside the label file, one taxon a row:

    name,rank,scientific_name,parent,gbif_key
    pterophorid,family,Pterophoridae,Pterophoroidea,
    Pterophoroidea,superfamily,Pterophoroidea,Lepidoptera,
    Lepidoptera,order,Lepidoptera,,797

Every classifier label is a row (its `name` is the label); the other rows are the higher taxa
the labels roll up to. Labels are the leaves: the classifier's probabilities are summed up the
parents, so a label that were also a parent would be counted twice. A parent's rank is always
higher than its child's, which also rules out cycles; both are checked, and every refusal is
one line naming the row. Kept free of torch: the producer and the CLI validate before any job.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Lowest first: roll-up walks this order and answers at the first rank that reaches the
# threshold.
RANKS: tuple[str, ...] = (
    "subspecies", "species", "genus", "subtribe", "tribe", "subfamily", "family",
    "superfamily", "order", "class", "phylum", "kingdom",
)
COLUMNS = ("name", "rank", "scientific_name", "parent", "gbif_key")
# Above one half, at most one taxon of a rank can reach it: the answer never hangs on a tie.
DEFAULT_THRESHOLD = 0.6


class TaxonomyError(ValueError):
    """A taxonomy, taxa list or threshold refused, in one line naming the label or line."""


@dataclass(frozen=True)
class Taxon:
    name: str  # a classifier label, or the higher taxon's own name
    rank: str
    scientific_name: str
    parent: str | None
    gbif_key: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "scientific_name": self.scientific_name,
            "parent": self.parent,
            "gbif_key": self.gbif_key,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Taxon:
        key = data.get("gbif_key")
        return cls(
            str(data["name"]), str(data["rank"]), str(data["scientific_name"]),
            data.get("parent") or None, int(key) if key is not None else None,
        )


@dataclass(frozen=True)
class Taxonomy:
    """Validated: every label once, every parent present and of a higher rank, no cycle."""

    taxa: tuple[Taxon, ...]

    def by_name(self) -> dict[str, Taxon]:
        return {t.name: t for t in self.taxa}

    def lineage(self, name: str) -> list[Taxon]:
        """The taxon and its ancestors, lowest first."""
        index = self.by_name()
        out = [index[name]]
        while out[-1].parent is not None:
            out.append(index[out[-1].parent])
        return out

    def ranks(self) -> list[str]:
        """The ranks present, lowest first: the levels of the roll-up."""
        present = {t.rank for t in self.taxa}
        return [r for r in RANKS if r in present]

    def names_at(self, rank: str) -> dict[str, str]:
        """Each taxon's scientific name at `rank`: its own ancestor (or itself) of that rank;
        a taxon above it, or on a branch without it, keeps its own name."""
        out = {}
        for taxon in self.taxa:
            lineage = self.lineage(taxon.name)
            at = next((t for t in lineage if t.rank == rank), taxon)
            out[taxon.name] = at.scientific_name
        return out

    def to_list(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.taxa]

    @classmethod
    def from_list(cls, rows: Iterable[dict[str, Any]]) -> Taxonomy:
        return cls(tuple(Taxon.from_dict(row) for row in rows))

    def sha256(self) -> str:
        canonical = json.dumps(self.to_list(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_taxonomy(path: Path, labels: Sequence[str]) -> Taxonomy:
    """Read and check a taxonomy CSV against the classifier's labels."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TaxonomyError(f"taxonomy {path}: {e.strerror or e}") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise TaxonomyError(
            f"taxonomy {path}: no column {', '.join(missing)} (header: {','.join(COLUMNS)})"
        )
    taxa: list[Taxon] = []
    lines: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        taxon = _taxon(path, line, row)
        if taxon.name in lines:
            raise TaxonomyError(
                f"taxonomy {path} line {line}: {taxon.name!r} is listed twice "
                f"(first on line {lines[taxon.name]})"
            )
        lines[taxon.name] = line
        taxa.append(taxon)
    check_taxonomy(Taxonomy(tuple(taxa)), labels, lambda name: f"taxonomy {path} line "
                   f"{lines[name]}")
    return Taxonomy(tuple(taxa))


def _taxon(path: Path, line: int, row: dict[str, str | None]) -> Taxon:
    def cell(column: str) -> str:
        return (row.get(column) or "").strip()

    where = f"taxonomy {path} line {line}"
    name, rank = cell("name"), cell("rank").lower()
    if not name:
        raise TaxonomyError(f"{where}: no name")
    if rank not in RANKS:
        raise TaxonomyError(f"{where}: rank {rank!r} of {name!r} is not one of {', '.join(RANKS)}")
    key = cell("gbif_key")
    if key and not key.isdigit():
        raise TaxonomyError(f"{where}: gbif_key {key!r} of {name!r} is not a number")
    return Taxon(name, rank, cell("scientific_name") or name, cell("parent") or None,
                 int(key) if key else None)


def check_taxonomy(
    taxonomy: Taxonomy, labels: Sequence[str], where: Callable[[str], str] | None = None
) -> None:
    """Labels missing, extra or duplicated, unknown parents, cycles, parents not of a higher
    rank, labels used as parents: the first found, as one line."""

    def at(name: str) -> str:
        return where(name) if where else "taxonomy"

    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise TaxonomyError(f"the classifier lists label {label!r} twice")
        seen.add(label)
    index = taxonomy.by_name()
    if len(index) != len(taxonomy.taxa):
        twice = next(t.name for t in taxonomy.taxa if sum(u.name == t.name
                                                          for u in taxonomy.taxa) > 1)
        raise TaxonomyError(f"{at(twice)}: {twice!r} is listed twice")
    for label in labels:
        if label not in index:
            raise TaxonomyError(f"taxonomy has no row for the classifier's label {label!r}")
    parents = {t.parent for t in taxonomy.taxa if t.parent is not None}
    for t in taxonomy.taxa:
        if t.parent is not None and t.parent not in index:
            raise TaxonomyError(f"{at(t.name)}: parent {t.parent!r} of {t.name!r} is not a row")
        if t.name in seen and t.name in parents:
            raise TaxonomyError(f"{at(t.name)}: label {t.name!r} is a parent; labels are the "
                                "leaves (give the higher taxon a name of its own)")
        if t.name not in seen and t.name not in parents:
            raise TaxonomyError(f"{at(t.name)}: {t.name!r} is no label of the classifier and "
                                "no parent of one")
    for t in taxonomy.taxa:
        chain = [t.name]
        node = t
        while node.parent is not None:
            if node.parent in chain:
                cycle = " -> ".join([*chain[chain.index(node.parent):], node.parent])
                raise TaxonomyError(f"{at(t.name)}: the parents make a cycle ({cycle})")
            chain.append(node.parent)
            node = index[node.parent]
    for t in taxonomy.taxa:
        if t.parent is not None:
            parent = index[t.parent]
            if RANKS.index(parent.rank) <= RANKS.index(t.rank):
                raise TaxonomyError(
                    f"{at(t.name)}: parent {parent.name!r} ({parent.rank}) of {t.name!r} "
                    f"({t.rank}) is not of a higher rank"
                )


def check_threshold(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise TaxonomyError(f"species threshold {value} is outside (0, 1]: give e.g. 0.6")
    return float(value)


def read_taxa_list(path: Path) -> list[str]:
    """A taxa list file: one label, taxon name, scientific name or GBIF key a line; `#`
    starts a comment. An empty list is refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TaxonomyError(f"taxa list {path}: {e.strerror or e}") from None
    entries = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    entries = [e for e in entries if e]
    if not entries:
        raise TaxonomyError(f"taxa list {path} names nothing (one taxon or GBIF key a line)")
    return entries


def kept_labels(
    entries: Sequence[str], labels: Sequence[str], taxonomy: Taxonomy | None
) -> tuple[str, ...]:
    """The classifier labels a taxa list keeps, in the classifier's order: a label named,
    or one under a taxon named (by name, scientific name or GBIF key). Entries the classifier
    cannot answer are fine (a regional list names more species than any model knows); a list
    that keeps no label is refused."""
    names: set[str] = set()
    for entry in entries:
        if entry in labels:
            names.add(entry)
        if taxonomy is None:
            continue
        for t in taxonomy.taxa:
            if entry in (t.name, t.scientific_name) or (
                entry.isdigit() and t.gbif_key == int(entry)
            ):
                names.add(t.name)
    if taxonomy is None:
        kept = [label for label in labels if label in names]
    else:
        kept = [label for label in labels
                if any(t.name in names for t in taxonomy.lineage(label))]
    if not kept:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise TaxonomyError(
            f"the taxa list ({shown}) names no label the classifier knows"
            + ("" if taxonomy else " (without a taxonomy only labels match, not GBIF keys)")
        )
    return tuple(kept)


@dataclass(frozen=True)
class AnswerPolicy:
    """How the species classifier's softmax becomes an answer: the labels a taxa list keeps
    (None: all), the taxonomy the scores are summed up (None: answers stay labels) and the
    species threshold below which they are. Part of a job's pipeline and of its fingerprint."""

    taxonomy: Taxonomy | None = None
    taxa: tuple[str, ...] | None = None
    threshold: float = DEFAULT_THRESHOLD

    def identity(self) -> dict[str, Any]:
        return {
            "taxonomy": self.taxonomy.sha256() if self.taxonomy else None,
            "taxa": list(self.taxa) if self.taxa is not None else None,
            "threshold": float(self.threshold),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.identity(),
                "taxonomy": self.taxonomy.to_list() if self.taxonomy else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnswerPolicy:
        taxa = data.get("taxa")
        rows = data.get("taxonomy")
        return cls(
            Taxonomy.from_list(rows) if rows else None,
            tuple(str(t) for t in taxa) if taxa is not None else None,
            float(data.get("threshold", DEFAULT_THRESHOLD)),
        )
