"""Where training runs: tf.distribute strategies on TensorFlow, keras.distribution on JAX.

Distribution is declared, not written: `Distribution.scope()` is
`strategy.scope()` on TensorFlow (one device, MirroredStrategy,
MultiWorkerMirroredStrategy from TF_CONFIG, TPUStrategy) and a no-op on JAX,
where `keras.distribution.set_distribution(DataParallel())` shards each batch
over the local devices. `any_worker(flag)` is the one collective pitchkeras
adds: every worker learns whether any worker was told to stop, so all of
them save and stop at the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

from pitchkeras.errors import InvalidArgument, UsageError


@dataclasses.dataclass
class Distribution:
    """The chosen placement of a run.

    Args:
        name: str. `one`, `mirrored`, `multiworker`, `tpu` (TensorFlow) or `data_parallel` (JAX).
        replicas: int. Replicas in sync (devices the global batch is split over).
        chief: bool. Whether this process writes files (one writer per cluster).
        strategy: tf.distribute.Strategy or None. TensorFlow only.
        description: str. For the log line.
    """

    name: str
    replicas: int
    chief: bool = True
    strategy: Any = None
    description: str = ""

    def scope(self):
        """Where the model and optimizer are built."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    @property
    def workers(self) -> int:
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if resolver is None or self.name != "multiworker":
            return 1
        return sum(len(tasks) for kind, tasks in resolver.cluster_spec().as_dict().items() if kind in ("chief", "worker"))

    def any_worker(self, flag: bool) -> bool:
        """Whether `flag` is set on any worker (a collective: every worker must call it at the same step)."""
        if self.workers == 1:
            return bool(flag)
        import tensorflow as tf

        strategy = self.strategy
        value = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
        return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None).numpy() > 0)


    def adapt_keras_model(self, model, batch) -> None:
        """Work around two Keras 3 (3.15) gaps in `fit`/`evaluate` under MultiWorkerMirroredStrategy.

        1. `fit` builds the compiled loss from the first batch averaged over replicas
           (`strategy.reduce("MEAN", batch)`), which this strategy cannot do for a dict of inputs:
           build it here from one local `batch` instead (model and optimizer are built already).
        2. Step logs are reduced with `strategy.reduce("MEAN", value, axis=0)`, which fails on a
           scalar loss: the steps return each value as a one-element vector, reduced to a scalar.
        """
        from keras import ops

        with self.scope():
            model._symbolic_build(data_batch=batch)
        model._maybe_symbolic_build = lambda *args, **kwargs: None

        def vectors(step):
            return lambda data: {name: ops.reshape(value, [1]) for name, value in step(data).items()}

        model.train_step, model.test_step = vectors(model.train_step), vectors(model.test_step)


def _tf_config_cluster() -> dict:
    try:
        return json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("cluster") or {}
    except json.JSONDecodeError as err:
        raise UsageError(f"TF_CONFIG is not valid JSON ({err})") from None


def make_distribution(name: str) -> Distribution:
    """The distribution `name` asks for on the active Keras backend.

    TensorFlow: `auto` is `multiworker` when TF_CONFIG names a cluster, `tpu`
    when a TPU is attached, `mirrored` with several GPUs, else `one`;
    `mirrored` without GPUs mirrors over the logical CPU devices (tests).
    JAX: `auto`/`mirrored` use `keras.distribution.DataParallel` over every
    local device when there are several; `multiworker`/`tpu` are
    tf.distribute names and are refused.
    """
    import keras

    if keras.config.backend() == "jax":
        return _jax_distribution(name)
    if keras.config.backend() != "tensorflow":
        raise UsageError(f"fine-tuning runs on the tensorflow or jax Keras backend, not {keras.config.backend()!r}")
    import tensorflow as tf

    if name == "auto":
        if _tf_config_cluster():
            name = "multiworker"
        elif os.environ.get("TPU_NAME"):
            name = "tpu"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "one":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise UsageError("--strategy multiworker needs TF_CONFIG describing the cluster (see BUILD_NOTES.md)")
        strategy = _multiworker_strategy(tf)
    elif name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as err:
            raise UsageError(f"--strategy tpu: no TPU found ({err})") from None
        strategy = tf.distribute.TPUStrategy(resolver)
    else:
        raise InvalidArgument(f"unknown strategy {name!r}")
    return Distribution(name, strategy.num_replicas_in_sync, _is_chief(strategy), strategy,
                        f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)")


_MULTIWORKER: dict = {}  # TF_CONFIG -> its MultiWorkerMirroredStrategy, made once per process


def _multiworker_strategy(tf):
    """This process's MultiWorkerMirroredStrategy for today's TF_CONFIG, made on first use and reused after.

    Making the strategy starts this worker's gRPC server and configures collective ops, which TensorFlow does
    once per process: a second fine-tuning in the same process (a notebook, a sweep) reuses the cluster.
    """
    key = os.environ["TF_CONFIG"]
    if key not in _MULTIWORKER:
        if _MULTIWORKER:
            raise UsageError("this process already joined another multi-worker cluster (TF_CONFIG changed); "
                             "TensorFlow starts one per process, so run this fine-tuning in a new process")
        _MULTIWORKER[key] = tf.distribute.MultiWorkerMirroredStrategy()
    return _MULTIWORKER[key]


def _is_chief(strategy) -> bool:
    """Whether this process writes files (always, except non-chief multi-worker tasks)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict())


def _jax_distribution(name: str) -> Distribution:
    import keras

    if name in ("multiworker", "tpu"):
        raise UsageError(f"--strategy {name} is a tf.distribute strategy; on KERAS_BACKEND=jax use auto "
                         "(DataParallel over the local devices) or one")
    devices = keras.distribution.list_devices()
    if name == "one" or len(devices) == 1:
        keras.distribution.set_distribution(None)
        return Distribution("one", 1, description=f"one {devices[0]}")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return Distribution("data_parallel", len(devices), description=f"keras.distribution.DataParallel over "
                        f"{len(devices)} devices")
