"""Step checkpoints: every model and optimizer variable plus the run state, atomic, restored by path.

A checkpoint is a directory `ckpt-<step:08d>/` holding

- `variables.npz`: one array per variable, written one variable at a time
  (host memory holds one array, not the whole model with its optimizer
  slots), and
- `state.json`: the step, the data position, the run id, and the path,
  shape and dtype of every variable, in the order of the arrays.

Each is written into a temp directory and renamed, and the `latest` pointer
is replaced atomically, so a crash never leaves half a checkpoint. Restore
matches variables by their Keras path (`gpt2_backbone/.../kernel`,
`adamw/..._momentum`), never by position, and refuses a checkpoint whose
variables or shapes differ from the model's.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Optional

from pitchkeras.errors import UsageError
from pitchkeras.io import atomic_directory, atomic_write_json, atomic_write_text

CHECKPOINTS = "checkpoints"  # inside the run dir: ckpt-00000040/ ... and the `latest` pointer
LATEST = "latest"
ARRAYS = "variables.npz"
STATE = "state.json"


def training_variables(model) -> dict:
    """{checkpoint key: variable} of the model and its optimizer (loss scale included).

    Model variables are keyed by their Keras path. Optimizer variables are
    keyed by their path with the optimizer's own name (Keras numbers unnamed
    optimizers per process: `adam_w`, `adam_w_1`) replaced by its role,
    `optimizer/` (the AdamW) or `loss_scale_optimizer/`. Keras's Adafactor
    names its two factored moments after the weight, alike, and its
    placeholders for vectors without the optimizer's prefix: a repeated
    optimizer key gets `#2`, `#3`... in the optimizer's own (build) order.
    """
    keyed = {}
    for variable in model.variables:
        keyed.setdefault(variable.path, []).append(variable)
    optimizer = getattr(model, "optimizer", None)
    seen_optimizer_keys: dict = {}
    if optimizer is not None:
        inner = getattr(optimizer, "inner_optimizer", None)
        owners = [(inner, "optimizer"), (optimizer, "loss_scale_optimizer")] if inner is not None else [
            (optimizer, "optimizer")]
        for variable in optimizer.variables:
            key = variable.path
            for owner, role in owners:
                if key.startswith(owner.name + "/"):
                    key = role + key[len(owner.name):]
                    break
            seen = seen_optimizer_keys.get(key, 0) + 1
            seen_optimizer_keys[key] = seen
            keyed.setdefault(key if seen == 1 else f"{key}#{seen}", []).append(variable)
    dupes = sorted(k for k, v in keyed.items() if len(v) > 1)
    if dupes:
        raise UsageError(f"variables with the same path cannot be checkpointed by path: {dupes[:5]}")
    return {key: found[0] for key, found in keyed.items()}


def _keyed(variables) -> dict:
    """`variables` as {key: variable}: a dict as it is, a list keyed by each variable's path."""
    if isinstance(variables, dict):
        return variables
    keyed = {}
    for variable in variables:
        if variable.path in keyed:
            raise UsageError(f"variables with the same path cannot be checkpointed by path: {variable.path}")
        keyed[variable.path] = variable
    return keyed


def save_checkpoint(checkpoints_dir: str | os.PathLike, variables, state: dict, keep: int) -> Path:
    """Write `variables` plus `state` as `ckpt-<state["step"]>/`, atomically, point `latest` at it, prune.

    Args:
        checkpoints_dir: str. The run's `checkpoints/` directory.
        variables: dict or list. {key: keras.Variable} (`training_variables(model)`), or variables keyed by path.
        state: dict. JSON-able run state; must hold `step`.
        keep: int. Checkpoints kept (the newest ones).

    Returns:
        The checkpoint directory.
    """
    import numpy as np

    checkpoints_dir = Path(checkpoints_dir)
    step = int(state["step"])
    keyed = _keyed(variables)
    final = checkpoints_dir / f"ckpt-{step:08d}"
    # replace: the same step saved again (e.g. interrupted right after a save)
    with atomic_directory(final, replace=True) as tmp:
        described = []
        with open(tmp / ARRAYS, "wb") as f:  # synced with the directory before it is renamed into place
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for i, (key, variable) in enumerate(keyed.items()):
                    array = np.asarray(variable.numpy())  # one variable on the host at a time
                    with archive.open(f"v{i:05d}.npy", "w", force_zip64=True) as entry:
                        np.lib.format.write_array(entry, array, allow_pickle=False)
                    described.append([key, list(array.shape), str(array.dtype)])
        atomic_write_json(tmp / STATE, dict(state, variables=described))
    atomic_write_text(checkpoints_dir / LATEST, final.name + "\n")
    for old in sorted(checkpoints_dir.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str | os.PathLike, restore_from: str) -> Optional[Path]:
    """The checkpoint directory `restore_from` names (`latest`, `fresh`, a run or checkpoint dir), or None."""
    run_dir = Path(run_dir)
    if restore_from == "fresh":
        return None
    if restore_from == "latest":
        pointer = run_dir / CHECKPOINTS / LATEST
        if not pointer.is_file():
            return None
        path = run_dir / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    else:
        path = Path(restore_from)
        if (path / CHECKPOINTS / LATEST).is_file():  # a run directory
            path = path / CHECKPOINTS / (path / CHECKPOINTS / LATEST).read_text(encoding="utf-8").strip()
    if not (path / STATE).is_file() or not (path / ARRAYS).is_file():
        raise UsageError(f"checkpoint {path} is missing or incomplete (needs {STATE} and {ARRAYS})")
    return path


def read_state(path: str | os.PathLike) -> dict:
    """The `state.json` of checkpoint `path`."""
    return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))


def read_arrays(path: str | os.PathLike) -> dict:
    """{variable path: numpy array} of checkpoint `path` (all in memory: for tests and inspection)."""
    import numpy as np

    saved = read_state(path)["variables"]
    with np.load(Path(path) / ARRAYS) as arrays:
        return {name: arrays[f"v{i:05d}"] for i, (name, *_rest) in enumerate(saved)}


def restore_checkpoint(path: str | os.PathLike, variables) -> dict:
    """Assign the saved values to `variables` (as for `save_checkpoint`), matched by key, and return the state.

    Raises:
        UsageError: a variable of the model is missing from the checkpoint, the
            checkpoint holds variables the model lacks, or a shape differs
            (another preset, `--lora-rank`, `--grad-accum` or `--mixed-precision`).
    """
    import numpy as np

    path = Path(path)
    state = read_state(path)
    saved = {name: (i, shape) for i, (name, shape, *_dtype) in enumerate(state.get("variables", []))}
    keyed = _keyed(variables)
    paths = list(keyed)
    hint = "was it made with another preset, --lora-rank, --grad-accum or --mixed-precision? (--restore-from fresh starts over)"
    missing = [p for p in paths if p not in saved]
    extra = sorted(set(saved) - set(paths))
    if missing or extra:
        what = []
        if missing:
            what.append(f"lacks {len(missing)} variable(s) of this model, e.g. {missing[0]}")
        if extra:
            what.append(f"holds {len(extra)} variable(s) this model does not have, e.g. {extra[0]}")
        raise UsageError(f"checkpoint {path} {' and '.join(what)}; {hint}")
    for name, variable in keyed.items():
        shape = saved[name][1]
        if list(shape) != list(variable.shape):
            raise UsageError(f"checkpoint {path}: {name} has shape {list(shape)}, this model's is "
                             f"{list(variable.shape)}; {hint}")
    with np.load(path / ARRAYS) as arrays:
        for name, variable in keyed.items():
            variable.assign(arrays[f"v{saved[name][0]:05d}"])  # one array in memory at a time
    return state
