"""What a taxa list and roll-up cost the forward, and what re-applying them later stores.

A 2,500-label species head (mobilenet_v3_large, random weights) behind the constant_boxes
detector (20 boxes an image, no detector cost, so the classifier's share is as large as it
gets), on the same frames, side by side in one run, batch by batch in alternation:
  (a) plain: the classifier's top-k, as without issue #24;
  (b) answers: a taxa list keeping 30 % of the labels, masked and renormalised, and the
      roll-up over a 2,500 species / 500 genera / 60 families / 8 orders taxonomy at 0.6;
  (c) answers + stored softmax: (b) and the full softmax copied back for re-applying.
Prints images/s of each and the ratios, and the bytes a detection stores today against with
the answers (rank and source) and the float16 softmax.

    .venv/bin/python -m bench.taxonomy [--labels 2500] [--rounds 6] [--crop 96]
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/taxonomy.py` runs as `python -m bench.taxonomy` would
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch
import torchvision

from inference.forward import BatchForward, ForwardOptions
from inference.pipeline_spec import ModelSource
from inference.registry import ConstantBoxes, LoadedModel, ModelEntry, Pipeline, resolve_device
from inference.taxonomy import AnswerPolicy, Taxon, Taxonomy
from inference.types import Detection

RANK_SIZES = (("genus", 500), ("family", 60), ("order", 8))


def taxonomy_of(labels: list[str]) -> Taxonomy:
    """Species spread evenly over genera, genera over families, families over orders."""
    taxa = []
    below = labels
    rank = "species"
    for parent_rank, count in RANK_SIZES:
        parents = [f"{parent_rank}{i}" for i in range(count)]
        taxa += [Taxon(name, rank, name.title(), parents[i * count // len(below)], None)
                 for i, name in enumerate(below)]
        below, rank = parents, parent_rank
    taxa += [Taxon(name, rank, name.title(), None, None) for name in below]
    return Taxonomy(tuple(taxa))


def pipeline(device: torch.device, labels: list[str], crop: int) -> Pipeline:
    det_spec = ModelEntry("constant_boxes", "detector", "constant_boxes", (270, 480), 2, None,
                         mean=None, std=None)
    det_source = ModelSource("constant_boxes", "", ("insect",), (270, 480), None)
    detector = LoadedModel(ConstantBoxes(boxes=20).eval().to(device), det_spec, det_source, 2)
    torch.manual_seed(0)
    module = torchvision.models.mobilenet_v3_large(num_classes=len(labels)).eval().to(device)
    cls_spec = ModelEntry("species", "classifier", "mobilenet_v3_large", (crop, crop),
                         len(labels), None)
    cls_source = ModelSource("species", "", tuple(labels), (crop, crop), None)
    classifier = LoadedModel(module, cls_spec, cls_source, len(labels))
    precision = "bf16" if device.type == "cuda" else "fp32"
    return Pipeline(device, detector, classifier, None, 0.5, precision, 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--labels", type=int, default=2500)
    p.add_argument("--images", type=int, default=4, help="images a batch")
    p.add_argument("--rounds", type=int, default=6, help="batches of each, alternating")
    p.add_argument("--crop", type=int, default=96, help="classifier input side")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    labels = [f"species{i}" for i in range(args.labels)]
    taxonomy = taxonomy_of(labels)
    kept = tuple(labels[::3])
    policy = AnswerPolicy(taxonomy, kept, 0.6)
    base = pipeline(device, labels, args.crop)
    ruled = replace(base, answers=policy)  # the same modules
    forwards = {
        "plain": BatchForward(base, ForwardOptions()),
        "answers": BatchForward(ruled, ForwardOptions()),
        "answers+softmax": BatchForward(ruled, ForwardOptions(probabilities=True)),
    }
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (3, 540, 960), dtype=torch.uint8, generator=generator)
              .to(device) for _ in range(args.images)]
    seconds = dict.fromkeys(forwards, 0.0)
    ratios: dict[str, list[float]] = {name: [] for name in forwards}
    sample = {}
    with torch.inference_mode():
        for forward in forwards.values():  # warm-up, untimed
            forward(images)
        names = list(forwards)
        for i in range(args.rounds):
            this_round = {}
            for name in names[i % 3:] + names[: i % 3]:  # each goes first in turn
                forward = forwards[name]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                sample[name] = forward(images)
                this_round[name] = time.perf_counter() - t0
                seconds[name] += this_round[name]
            for name in forwards:
                ratios[name].append(this_round[name] / this_round["plain"])
    load1 = os.getloadavg()[0]
    rate = {name: args.rounds * args.images / s for name, s in seconds.items()}
    for name in forwards:
        print(f"{name:>16}: {rate[name]:7.2f} images/s, median time over plain's in the same "
              f"round {statistics.median(ratios[name]):.4f}   load1 {load1:.2f}")
    plain_over = {name: statistics.median(ratios[name]) for name in forwards}
    crops = sum(len(found) for found in sample["plain"])
    alone = rollup_alone(forwards["answers"], crops, args.labels, device)
    per_crop = seconds["plain"] / args.rounds / crops
    print(f"mask + roll-up alone: {alone * 1e3:.3f} ms per crop against the plain forward's "
          f"{per_crop * 1e3:.3f} ms per crop ({alone / per_crop:.4f})   load1 {load1:.2f}")
    ranks: dict[str, int] = {}
    for image in sample["answers"]:
        for d in image:
            c = d.classifications[-1]
            ranks[c.rank or "?"] = ranks.get(c.rank or "?", 0) + 1
    print(f"answers by rank (random head, flat softmax): {json.dumps(ranks)}")
    today = stored_bytes(sample["plain"][0][0], with_answers=False)
    answers = stored_bytes(sample["answers+softmax"][0][0], with_answers=True)
    print(f"bytes a detection stores (payload): today {today}, with answers and the float16 "
          f"softmax {answers} (softmax {2 * args.labels})")
    print(
        f"RESULT labels={args.labels} answers_slower={plain_over['answers'] - 1:.4f} "
        f"answers_softmax_slower={plain_over['answers+softmax'] - 1:.4f} "
        f"rollup_share={alone / per_crop:.4f} "
        f"bytes_today={today} bytes_with_softmax={answers} load1={load1:.2f} device={device}"
    )


def rollup_alone(forward: BatchForward, crops: int, labels: int, device: torch.device) -> float:
    """Seconds per crop of the mask and roll-up by themselves, on logits of a batch's size."""
    rollup = forward._rollup
    assert rollup is not None
    logits = torch.randn((crops, labels), generator=torch.Generator().manual_seed(1)).to(device)
    rounds = 20
    rollup.answer(rollup.mask(logits).softmax(dim=1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        rollup.answer(rollup.mask(logits).softmax(dim=1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / rounds / crops


def stored_bytes(d: Detection, with_answers: bool) -> int:
    """The values db.results writes for one detection and its classification: 5 floats and
    the label of the box, the classifier's name, label, score and top-k JSON, and with the
    answers the rank, the prediction source and the softmax."""
    c = d.classifications[-1]
    topk = json.dumps([[label, float(score)] for label, score in c.topk])
    size = 5 * 8 + len(d.label) + len(c.classifier) + len(c.label) + 8 + len(topk)
    if with_answers:
        size += len(c.rank or "") + len(c.source) + len(c.probabilities or b"")
    return size


if __name__ == "__main__":
    main()
