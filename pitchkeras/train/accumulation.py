"""Gradient accumulation on JAX that updates the weights only at the last micro-batch.

Keras 3.15's `JaxOptimizer._backend_apply_gradients` accumulates without
branching on the update: at every micro-batch it clips, decays and runs the
whole optimizer update, then keeps the result or the old values with a
`lax.cond` on whether this is the last micro-batch. A run with `--grad-accum N`
thus pays the update N times per step, and the compiled step keeps the old and
the new weights and optimizer state alive together.

`update_only_when_due(optimizer)` replaces that method on one optimizer
instance with one `lax.cond` whose update branch runs the update (in a
`StatelessScope` of its own, so nothing leaks out of the branch's trace) and
whose other branch only adds the gradient to the accumulators. The arithmetic
is Keras's: the mean of the micro-batches' gradients, clipped, weight-decayed,
then the optimizer's own `update_step`, and the iteration counter still
advances at every micro-batch (the learning-rate schedule counts them).
"""

from __future__ import annotations


def update_only_when_due(optimizer) -> bool:
    """On JAX with gradient accumulation, make `optimizer` update only at the last micro-batch; whether it did."""
    import keras

    if keras.config.backend() != "jax" or not optimizer.gradient_accumulation_steps or optimizer.use_ema:
        return False
    optimizer._backend_apply_gradients = _apply_when_due(optimizer)
    return True


def _apply_when_due(optimizer):
    def apply_gradients(grads, trainable_variables):
        import jax
        import jax.numpy as jnp
        import keras

        steps = optimizer.gradient_accumulation_steps
        accumulators = [optimizer._accumulated_gradients[optimizer._get_variable_index(v)]
                        for v in trainable_variables]
        accumulator_ids = {id(a) for a in accumulators}
        # Everything the update may read or write: the weights and every optimizer variable but the accumulators
        # (the iteration counter, which the learning-rate schedule reads, included).
        tracked = list(trainable_variables) + [v for v in optimizer.variables if id(v) not in accumulator_ids]
        due = (optimizer._iterations + 1) % steps == 0

        def update(values, sums, grads):
            with keras.StatelessScope(state_mapping=list(zip(tracked, values))) as scope:
                mean = [(g + s) / steps for g, s in zip(grads, sums)]
                mean = optimizer._clip_gradients(mean)
                optimizer._apply_weight_decay(trainable_variables)
                optimizer._backend_update_step(mean, trainable_variables, optimizer.learning_rate)
            after = [scope.get_current_value(v) for v in tracked]
            return ([value if new is None else new for value, new in zip(values, after)],
                    [jnp.zeros_like(s) for s in sums])

        def accumulate(values, sums, grads):
            return list(values), [g + s for g, s in zip(grads, sums)]

        values, sums = jax.lax.cond(due, update, accumulate, [v.value for v in tracked],
                                    [a.value for a in accumulators], [g.astype(a.dtype) for g, a in
                                                                      zip(grads, accumulators)])
        for variable, value in zip(tracked, values):
            variable.assign(value)
        for accumulator, value in zip(accumulators, sums):
            accumulator.assign(value)

    return apply_gradients

