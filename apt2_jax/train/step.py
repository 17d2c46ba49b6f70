"""The guarded step: per-step rng, the loop's counters and the non-finite guard around a stage's
`train_step(state, frozen, batch, rng) -> (state, metrics)`."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def init_counters():
  """The counters the loop keeps in every state (scalars, int32)."""
  return {"step": jnp.zeros((), jnp.int32), "nonfinite_in_a_row": jnp.zeros((), jnp.int32),
          "nonfinite_total": jnp.zeros((), jnp.int32)}


# `init_counters`' keys, spelt out: no arrays at import time, since `main` imports this package
# before `jax.distributed.initialize`, which must precede the backend's start.
COUNTERS = ("step", "nonfinite_in_a_row", "nonfinite_total")


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def guarded_step(stage, seed: int):
  """The stage's step with the per-step rng, the counters and the non-finite guard.

  A step whose metrics (the loss and the gradient norms every stage reports) are not all finite
  is skipped: the state stays as it was. Finite gradients give finite updates, so the metrics
  decide; checking every leaf of the new state as well made XLA's compile of the whole step
  about 5x slower (the adversarial step: 30 s -> 147 s on CPU) for no extra safety.
  """
  def train_step(state, frozen, batch):  # the name the compile notices show: jit(train_step)
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    new_state, metrics = stage.train_step(state, frozen, batch, rng)
    finite = _all_finite(metrics)
    out = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    out["step"] = state["step"] + 1
    out["nonfinite_in_a_row"] = jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1)
    out["nonfinite_total"] = state["nonfinite_total"] + (~finite).astype(jnp.int32)
    metrics = dict(metrics, nonfinite_in_a_row=out["nonfinite_in_a_row"],
                   nonfinite_total=out["nonfinite_total"])
    return out, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)
  return train_step


def check_nonfinite(metrics, step: int, max_bad: int):
  """Raises FloatingPointError after `max_bad` skipped (non-finite) steps in a row."""
  if metrics["nonfinite_in_a_row"] >= max_bad:
    raise FloatingPointError(
        f"{int(metrics['nonfinite_in_a_row'])} non-finite steps in a row at step {step} (loss "
        f"{float(metrics['loss'])}); aborting (config.max_nonfinite_in_a_row={max_bad}). Lower "
        "the learning rate or check the data; the last finite state is in the latest checkpoint.")
