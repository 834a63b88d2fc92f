"""Training checkpoints as safetensors + JSON, written atomically; nothing here unpickles anything.

A checkpoint is a folder `checkpoint-<images seen>` holding tensors.safetensors (model, EMA,
optimizer moments, RNG states) and state.json (counters, optimizer hyper-parameters, scheduler
and grad-scaler state). The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run folder keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {int(i): dict(values) for i, values in plain["state"].items()}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(
    directory: Path,
    images_seen: int,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write one checkpoint; `tensors` holds named tensors (model.*, ema.*, rng.*), `state` plain JSON values."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{images_seen:012d}"
    partial = directory / f".partial-{images_seen:012d}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    optimizer_tensors, optimizer_plain = _split_optimizer(optimizer.state_dict())
    all_tensors = {name: t.detach().cpu().contiguous() for name, t in {**tensors, **optimizer_tensors}.items()}
    save_file(all_tensors, partial / "tensors.safetensors")
    (partial / "state.json").write_text(json.dumps({**state, "optimizer": optimizer_plain}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    complete = [p for p in sorted(Path(directory).glob(f"{PREFIX}*")) if (p / "state.json").exists()]
    return complete[-1] if complete else None


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the optimizer in place; return the other tensors and the JSON state."""
    tensors = load_file(path / "tensors.safetensors")
    state = json.loads((path / "state.json").read_text())
    optimizer.load_state_dict(_join_optimizer(tensors, state.pop("optimizer")))
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}, state
