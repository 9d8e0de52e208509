"""Masking and roll-up agree with an independent NumPy computation of the same definition:
softmax renormalised over the kept labels; a taxon's score is the sum over the labels under
it; below the threshold the answer is the best taxon of the lowest rank whose score reaches
it (ties: the first in order). Bad taxonomies, lists and thresholds are refused in one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.rollup import SOURCES, Rollup
from inference.taxonomy import (
    RANKS,
    AnswerPolicy,
    TaxonomyError,
    check_threshold,
    kept_labels,
    load_taxonomy,
    read_taxa_list,
)

CHECKPOINTS = Path(__file__).resolve().parents[1] / "inference" / "checkpoints"
LABELS = ["a1", "a2", "b1", "c1", "c2", "c3"]
# species a1 a2 in genus A; b1 in B; A, B in family F; c1 c2 c3 in genus C, family G; order O
TAXONOMY = """name,rank,scientific_name,parent,gbif_key
a1,species,Aus one,A,11
a2,species,Aus two,A,12
b1,species,Bus one,B,
c1,species,Cus one,C,
c2,species,Cus two,C,
c3,species,Cus three,C,
A,genus,Aus,F,
B,genus,Bus,F,
C,genus,Cus,G,
F,family,Fidae,O,
G,family,Gidae,O,
O,order,Oida,,
"""
PARENT = {"a1": "A", "a2": "A", "b1": "B", "c1": "C", "c2": "C", "c3": "C",
          "A": "F", "B": "F", "C": "G", "F": "O", "G": "O", "O": None}
RANK = {**dict.fromkeys(LABELS, "species"), "A": "genus", "B": "genus", "C": "genus",
        "F": "family", "G": "family", "O": "order"}
ORDER = [*LABELS, "A", "B", "C", "F", "G", "O"]


def _write(tmp_path: Path, text: str, name: str = "taxonomy.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _reference(
    logits: np.ndarray, kept: list[str], threshold: float
) -> list[tuple[str, float, bool]]:
    """Plain NumPy, float64: each row's answer, its score and whether it was rolled up."""
    out = []
    keep = np.array([label in kept for label in LABELS])
    for z in logits.astype(np.float64):
        e = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        p = e / e.sum()
        best = int(np.argmax(p))
        if p[best] >= threshold:
            out.append((LABELS[best], float(p[best]), False))
            continue

        def under(node: str, p: np.ndarray = p) -> float:
            total = 0.0
            for i, label in enumerate(LABELS):
                n: str | None = label
                while n is not None:
                    if n == node:
                        total += p[i]
                        break
                    n = PARENT[n]
            return total

        answer = None
        for rank in [r for r in RANKS if r in RANK.values()]:
            nodes = [n for n in ORDER if RANK[n] == rank]
            scores = [under(n) for n in nodes]
            j = int(np.argmax(scores))
            if scores[j] >= threshold:
                answer = (nodes[j], scores[j], nodes[j] != LABELS[best])
                break
        out.append(answer or ("O", under("O"), True))
    return out


def _rollup(tmp_path: Path, kept: list[str] | None, threshold: float) -> Rollup:
    taxonomy = load_taxonomy(_write(tmp_path, TAXONOMY), LABELS)
    taxa = kept_labels(kept, LABELS, taxonomy) if kept else None
    return Rollup(AnswerPolicy(taxonomy, taxa, threshold), LABELS, torch.device("cpu"))


def _answers(rollup: Rollup, logits: np.ndarray) -> list[tuple[str, float, str]]:
    probs = rollup.mask(torch.tensor(logits, dtype=torch.float32)).softmax(dim=1)
    rows = rollup.answer(probs).numpy()
    return [(rollup.names[int(n)], float(s), SOURCES[int(c)]) for n, s, c in rows]


@pytest.mark.parametrize(
    ("kept", "threshold"),
    [(None, 0.6), (None, 0.3), (["a1", "a2", "c1", "c3"], 0.6), (["C"], 0.9), (["b1"], 0.6),
     (["Aus", "12", "c2"], 1.0)],
)
def test_mask_and_rollup_match_numpy(tmp_path: Path, kept: list[str] | None,
                                     threshold: float) -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, (300, len(LABELS)))
    logits[0] = [1, 1, 1, 1, 1, 1]  # ties everywhere: first in order wins
    logits[1] = [2, 2, 0, 2, 2, 0]  # A and C tie as genera... but C has c3 too
    logits[2] = [0, 0, 0, 3, 3, 3]
    logits[3] = [5, 5, -9, -9, -9, -9]  # two congeners at 0.5: genus A
    rollup = _rollup(tmp_path, kept, threshold)
    keep = list(rollup.policy.taxa or LABELS)
    got = _answers(rollup, logits)
    want = _reference(logits, keep, threshold)
    masked = len(keep) < len(LABELS)
    for (name, score, source), (ref_name, ref_score, rolled) in zip(got, want, strict=True):
        assert (name, score) == (ref_name, pytest.approx(ref_score, abs=1e-6))
        assert source == SOURCES[2 * masked + rolled]


def test_two_congeners_roll_up_to_their_genus(tmp_path: Path) -> None:
    got = _answers(_rollup(tmp_path, None, 0.6), np.array([[5, 5, -9, -9, -9, -9.0]]))
    assert got == [("A", pytest.approx(1.0, abs=1e-5), "rolled-up")]


def test_a_list_keeping_one_label_answers_it_at_one(tmp_path: Path) -> None:
    rollup = _rollup(tmp_path, ["b1"], 0.6)
    got = _answers(rollup, np.array([[9, 9, -3, 0, 0, 0.0]]))
    assert got == [("b1", pytest.approx(1.0), "masked")]


def test_demo_taxonomy_fits_the_demo_classifier() -> None:
    labels = (CHECKPOINTS / "demo_classifier_labels.txt").read_text().split()
    taxonomy = load_taxonomy(CHECKPOINTS / "demo_classifier_taxonomy.csv", labels)
    names = [t.scientific_name for t in taxonomy.lineage("pterophorid")]
    assert names == ["Pterophoridae", "Pterophoroidea", "Lepidoptera"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("c3,species,Cus three,C,\n", ""),
         "taxonomy has no row for the classifier's label 'c3'"),
        (lambda t: t + "d1,species,Dus one,C,\n", "line 14: 'd1' is no label of the classifier"),
        (lambda t: t + "a1,species,Aus one,A,\n",
         "line 14: 'a1' is listed twice (first on line 2)"),
        (lambda t: t.replace("F,family,Fidae,O,", "F,family,Fidae,A,"), "parents make a cycle"),
        (lambda t: t.replace("A,genus,Aus,F,", "A,family,Aus,F,"),
         "line 8: parent 'F' (family) of 'A' (family) is not of a higher rank"),
        (lambda t: t.replace("a2,species,Aus two,A,", "a2,species,Aus two,Q,"),
         "line 3: parent 'Q' of 'a2' is not a row"),
        (lambda t: t.replace("b1,species", "b1,specie"), "line 4: rank 'specie' of 'b1'"),
        (lambda t: t.replace("b1,species,Bus one,B,", "b1,species,Bus one,a1,"),
         "label 'a1' is a parent"),
    ],
)
def test_bad_taxonomies_are_refused_in_one_line(
    tmp_path: Path, edit: Callable[[str], str], message: str
) -> None:
    with pytest.raises(TaxonomyError) as e:
        load_taxonomy(_write(tmp_path, edit(TAXONOMY)), LABELS)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_duplicated_classifier_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match="lists label 'a1' twice"):
        load_taxonomy(_write(tmp_path, TAXONOMY), [*LABELS, "a1"])


def test_a_list_naming_nothing_the_classifier_knows_is_refused(tmp_path: Path) -> None:
    taxonomy = load_taxonomy(_write(tmp_path, TAXONOMY), LABELS)
    path = _write(tmp_path, "# Quebec\nZus zed\n999\n", "list.txt")
    with pytest.raises(TaxonomyError, match=r"taxa list \(Zus zed, 999\) names no label"):
        kept_labels(read_taxa_list(path), LABELS, taxonomy)
    with pytest.raises(TaxonomyError, match="names nothing"):
        read_taxa_list(_write(tmp_path, "# only a comment\n", "empty.txt"))


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
def test_thresholds_outside_zero_one_are_refused(value: float) -> None:
    with pytest.raises(TaxonomyError, match=r"outside \(0, 1\]"):
        check_threshold(value)
