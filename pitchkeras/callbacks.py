"""Keras callbacks for fine-tuning a keras-hub CausalLM in your own `fit` (see `pitchkeras.train.callbacks`)."""

from pitchkeras.train.callbacks import (  # noqa: F401 - the public names
    ConditionValidation,
    LossPlot,
    MetricsCSV,
    Progress,
    SampleWriter,
    StepCheckpoint,
    StopOnSignal,
)

__all__ = ["ConditionValidation", "LossPlot", "MetricsCSV", "Progress", "SampleWriter", "StepCheckpoint",
           "StopOnSignal"]
