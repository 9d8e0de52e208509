"""Weight files and label files: where they come from, what shape they are, what they hold.

Users bring checkpoints saved every which way (raw state dicts, training-loop wrappers,
DataParallel prefixes, TorchScript); this module turns each into one of two things the registry
can use: a state dict, or a ready TorchScript module.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from inference.pipeline_spec import sha256_of

WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")


class WeightsError(Exception):
    """A weight or label file that cannot be used; the message says which and why."""


@dataclass
class Checkpoint:
    """Either a state dict or a TorchScript module, plus the file's sha256 (its version)."""

    sha256: str
    state_dict: dict[str, torch.Tensor] | None = None
    scripted: nn.Module | None = None


def load_checkpoint(path: Path, expected_sha256: str | None = None) -> Checkpoint:
    digest = sha256_of(path)
    if expected_sha256 and digest.lower() != expected_sha256.strip().lower():
        raise WeightsError(
            f"sha256 mismatch for {path}: expected {expected_sha256}, file has {digest}; "
            "the file is corrupt or not the one you meant"
        )
    if is_torchscript(path):
        return Checkpoint(digest, scripted=torch.jit.load(str(path), map_location="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    return Checkpoint(digest, state_dict=unwrap_state_dict(obj, path))


def is_torchscript(path: Path) -> bool:
    """TorchScript archives carry compiled code; torch.save archives never do."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise WeightsError(
            f"{path} holds no state dict (expected tensors, or one under "
            f"{' / '.join(WRAPPER_KEYS)})"
        )
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def num_classes(state_dict: dict[str, torch.Tensor], key: str, divisor: int, path: str) -> int:
    """Classes from the output layer's shape; divisor is the anchors per location where the
    head predicts every class for every anchor (RetinaNet, SSD)."""
    if key not in state_dict:
        raise WeightsError(f"{path} has no '{key}': it is not a checkpoint of this architecture")
    rows = state_dict[key].shape[0]
    if rows % divisor:
        raise WeightsError(f"'{key}' in {path} has {rows} rows, not a multiple of {divisor}")
    return rows // divisor


def load_labels(path: str | Path) -> list[str]:
    """One label per line, or JSON: a list, or {index: label}."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"labels file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WeightsError(f"labels file {p} is not valid JSON: {e}") from None
        if isinstance(data, list):
            return [str(x) for x in data]
        if isinstance(data, dict):
            try:
                items = sorted((int(k), str(v)) for k, v in data.items())
            except ValueError:
                raise WeightsError(f"labels file {p}: keys must be class indices") from None
            labels = [str(i) for i in range(items[-1][0] + 1)] if items else []
            for i, label in items:
                labels[i] = label
            return labels
        raise WeightsError(f"labels file {p}: expected a JSON list or object")
    return [line.strip() for line in text.splitlines() if line.strip()]
