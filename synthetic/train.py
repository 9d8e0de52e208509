"""Trains the demo detector and classifier on synthetic scenes, on the CPU, from a seed.

    python -m synthetic.train --out inference/checkpoints --seed 0

A pool of scenes is rendered once (JPEG round trip included, as the worker sees them); the
detector trains on whole flipped captures, the classifier on jittered roi_align crops of their
insects, as the engine cuts them from a detector's boxes. Ends with an evaluation on scenes that
training never saw.
"""

from __future__ import annotations

import argparse
import io
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from inference.architectures import (
    CLASSIFIER_INPUT_SIZE,
    CLASSIFIER_MEAN,
    CLASSIFIER_STD,
    DETECTOR_MAX_SIZE,
    DETECTOR_MIN_SIZE,
    tiny_classifier,
    tiny_detector,
)
from synthetic.evaluate import Scores, score_image
from synthetic.scenes import KINDS, render_scene

TRAIN_STREAM = 7  # scene seeds (seed, 7, i): never equal to generate_night's (seed, i)
HELD_OUT_STREAM = 8
DETECTOR_LABELS = ("insect",)
DETECTOR_WEIGHTS = "demo_detector.pt"
CLASSIFIER_WEIGHTS = "demo_classifier.pt"


def _render(args: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed, stream, i = args
    image, insects = render_scene((seed, stream, i))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    pixels = np.asarray(Image.open(buf).convert("RGB"))
    boxes = torch.tensor([x.box for x in insects], dtype=torch.float32).reshape(-1, 4)
    kinds = torch.tensor([KINDS.index(x.kind) for x in insects], dtype=torch.int64)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1), boxes, kinds


def render_pool(seed: int, stream: int, n: int, processes: int) -> list[tuple[torch.Tensor, ...]]:
    """Scenes rendered by `processes` forked workers, or in this process for one: a fork of a
    process whose other threads hold locks (torch's pools, a test's workers) can hang forever."""
    jobs = [(seed, stream, i) for i in range(n)]
    if processes <= 1:
        return [_render(job) for job in jobs]
    with Pool(processes) as pool:
        return pool.map(_render, jobs, chunksize=4)


def _crop_and_flip(img: torch.Tensor, boxes: torch.Tensor, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random square of full height (the detector still halves it, as a whole 16:9 capture)
    flipped at random; insects cut by the square keep their visible part if most is visible."""
    _, h, w = img.shape
    x0 = int(torch.randint(w - h + 1, (1,), generator=gen)) if w > h else 0
    img = img[:, :, x0:x0 + h]
    cut = boxes.clone()
    cut[:, [0, 2]] = (cut[:, [0, 2]] - x0).clamp(0, img.shape[2])
    visible = (cut[:, 2] - cut[:, 0]) / (boxes[:, 2] - boxes[:, 0])
    boxes = cut[visible >= 0.5]
    _, h, w = img.shape
    if torch.rand(1, generator=gen).item() < 0.5:
        img = img.flip(2)
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if torch.rand(1, generator=gen).item() < 0.5:
        img = img.flip(1)
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    return img, boxes


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_detector(pool: list[tuple[torch.Tensor, ...]], steps: int, batch: int, lr: float,
                   gen: torch.Generator) -> nn.Module:
    model = tiny_detector(len(DETECTOR_LABELS))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 50))
    start = time.monotonic()
    for step in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=gen).tolist()
        images, targets = [], []
        for i in idx:
            img, boxes, _ = pool[i]
            img, boxes = _crop_and_flip(img, boxes, gen)
            img, factor = shrink_for_detector(img.float() / 255)
            images.append(img)
            boxes = boxes / factor
            targets.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64)})
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            print(f"detector step {step}/{steps} {parts} {time.monotonic() - start:.0f}s",
                  flush=True)
    return model.eval()


def jitter_boxes(boxes: torch.Tensor, gen: torch.Generator, amount: float = 0.08) -> torch.Tensor:
    """Moves and resizes boxes as much as a detector's boxes miss the truth."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=gen) * amount * wh
    return boxes + noise


def crops(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Normalised classifier inputs cut from a [0, 1] image, as the engine cuts them."""
    out = roi_align(image[None], [boxes], output_size=CLASSIFIER_INPUT_SIZE, aligned=True)
    mean = torch.tensor(CLASSIFIER_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLASSIFIER_STD).view(1, 3, 1, 1)
    return (out - mean) / std


def _crop_set(pool: list[tuple[torch.Tensor, ...]], copies: int, gen: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for img, boxes, kinds in pool:
        if len(boxes) == 0:
            continue
        image = img.float() / 255
        for _ in range(copies):
            xs.append(crops(image, jitter_boxes(boxes, gen)))
            ys.append(kinds)
    return torch.cat(xs), torch.cat(ys)


def train_classifier(pool: list[tuple[torch.Tensor, ...]], steps: int, batch: int, lr: float,
                     gen: torch.Generator) -> nn.Module:
    x, y = _crop_set(pool, 2, gen)
    print(f"classifier crops: {len(y)}", flush=True)
    model = tiny_classifier(len(KINDS))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 20))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    start = time.monotonic()
    for step in range(steps):
        idx = torch.randint(len(y), (batch,), generator=gen)
        xb = x[idx]
        if torch.rand(1, generator=gen).item() < 0.5:
            xb = xb.flip(3)
        xb = torch.rot90(xb, int(torch.randint(4, (1,), generator=gen)), dims=(2, 3))
        xb = xb * (1 + 0.1 * torch.randn(batch, 1, 1, 1, generator=gen))
        loss = loss_fn(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"classifier step {step}/{steps} loss={loss.item():.3f} "
                  f"{time.monotonic() - start:.0f}s", flush=True)
    return model.eval()


def load_models(folder: Path) -> tuple[nn.Module, nn.Module]:
    """The demo detector and classifier in eval mode, from the state dicts in ``folder``."""
    det_state = torch.load(folder / DETECTOR_WEIGHTS, weights_only=True)
    cls_state = torch.load(folder / CLASSIFIER_WEIGHTS, weights_only=True)
    detector = tiny_detector(det_state["head.classification_head.cls_logits.bias"].shape[0])
    classifier = tiny_classifier(cls_state["fc.weight"].shape[0])
    detector.load_state_dict(det_state)
    classifier.load_state_dict(cls_state)
    return detector.eval(), classifier.eval()


def shrink_for_detector(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Antialiased resize to the detector's input size, as the engine does before the model (the
    model's own transform then resizes nothing); returns it and the (x, y, x, y) factors."""
    h, w = image.shape[-2:]
    scale = min(DETECTOR_MIN_SIZE / min(h, w), DETECTOR_MAX_SIZE / max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
    return small, torch.tensor([w / size[1], h / size[0]] * 2)


@torch.no_grad()
def predict(detector: nn.Module, classifier: nn.Module, image: torch.Tensor,
            box_threshold: float) -> tuple[list[list[float]], list[str], list[float]]:
    """Boxes, kinds and detector scores for one [0, 1] image, the way the worker chains them."""
    small, factor = shrink_for_detector(image)
    out = detector([small])[0]
    keep = out["scores"] >= box_threshold
    boxes = out["boxes"][keep] * factor
    if len(boxes) == 0:
        return [], [], []
    kinds = classifier(crops(image, boxes)).argmax(1)
    return boxes.tolist(), [KINDS[k] for k in kinds], out["scores"][keep].tolist()


def evaluate(detector: nn.Module, classifier: nn.Module, pool: list[tuple[torch.Tensor, ...]],
             box_threshold: float) -> Scores:
    total = Scores()
    for img, boxes, kinds in pool:
        pb, pk, _ = predict(detector, classifier, img.float() / 255, box_threshold)
        total += score_image(pb, pk, boxes.tolist(), [KINDS[k] for k in kinds])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("inference/checkpoints"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=120, help="training scenes rendered")
    parser.add_argument("--held-out", type=int, default=12, help="evaluation scenes")
    parser.add_argument("--detector-steps", type=int, default=1400)
    parser.add_argument("--classifier-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=2, help="detector images per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=["detector", "classifier"],
                        default=["detector", "classifier"],
                        help="which to train; the other is read back from --out")
    parser.add_argument("--box-threshold", type=float, default=0.5)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.monotonic()
    pool = render_pool(args.seed, TRAIN_STREAM, args.scenes, args.threads)
    held_out = render_pool(args.seed, HELD_OUT_STREAM, args.held_out, args.threads)
    print(f"rendered {len(pool)}+{len(held_out)} scenes in {time.monotonic() - start:.0f}s",
          flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    if "classifier" in args.models:
        classifier = train_classifier(pool, args.classifier_steps, 128, 3e-3, gen)
        torch.save(classifier.state_dict(), args.out / CLASSIFIER_WEIGHTS)
        (args.out / "demo_classifier_labels.txt").write_text("\n".join(KINDS) + "\n")
    if "detector" in args.models:
        detector = train_detector(pool, args.detector_steps, args.batch, 2e-3, gen)
        torch.save(detector.state_dict(), args.out / DETECTOR_WEIGHTS)
        (args.out / "demo_detector_labels.txt").write_text("\n".join(DETECTOR_LABELS) + "\n")
    detector, classifier = load_models(args.out)
    scores = evaluate(detector, classifier, held_out, args.box_threshold)
    print(f"held-out at box_threshold={args.box_threshold}: {scores.summary()}")
    print(f"total {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
