"""The accelerators this process sees (`DeviceFacts`) and the dtype policy chosen for them (`choose_policy`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What `choose_policy` looks at: accelerators attached to this process.

    Args:
        tpus: int. TPU cores.
        gpu_capabilities: tuple of (major, minor). CUDA compute capability of each GPU.
    """

    tpus: int = 0
    gpu_capabilities: tuple = ()

    @classmethod
    def detect(cls) -> "DeviceFacts":
        """The facts of this machine, from the active Keras backend."""
        import keras

        if keras.config.backend() == "jax":
            import jax

            devices = jax.devices()
            gpus = [d for d in devices if d.platform == "gpu"]
            capabilities = tuple(tuple(int(x) for x in str(getattr(d, "compute_capability", "0.0")).split(".")[:2])
                                 for d in gpus)
            return cls(tpus=sum(d.platform == "tpu" for d in devices), gpu_capabilities=capabilities)
        import tensorflow as tf

        tpus = len(tf.config.list_logical_devices("TPU")) or (1 if os.environ.get("TPU_NAME") else 0)
        capabilities = tuple(
            tuple(tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)))
            for g in tf.config.list_physical_devices("GPU"))
        return cls(tpus=tpus, gpu_capabilities=capabilities)


def choose_policy(requested: str, devices: Optional[DeviceFacts] = None) -> str:
    """The Keras dtype policy for `requested` on this machine (or on `devices`).

    `auto`: `mixed_bfloat16` on TPUs and on GPUs of compute capability 8.0 or
    more (Ampere, Hopper), `mixed_float16` (with Keras's loss scaling) on
    older GPUs, `float32` on CPU (where bfloat16 trained slower: BUILD_NOTES.md).

    Args:
        requested: str. One of `PRECISIONS`.
        devices: DeviceFacts or None. Injected facts (tests); None detects them.
    """
    if requested != "auto":
        return requested
    devices = devices or DeviceFacts.detect()
    if devices.tpus:
        return "mixed_bfloat16"
    if not devices.gpu_capabilities:
        return "float32"
    return "mixed_bfloat16" if min(devices.gpu_capabilities) >= (8, 0) else "mixed_float16"
