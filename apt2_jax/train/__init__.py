"""The training layer below the stages: the shared loop, the guarded step, optimisers, data
iterators, config validation and the one stage registry.

  loop       Stage (the interface every trainer implements), train_and_evaluate, shardings
  step       the guarded step (per-step rng, counters, non-finite guard)
  optim      make_optimizer, learning_rate_schedule, accumulate_gradients, ema_update, ...
  data       per-host checkpointable batch iterators (`config.data.source`)
  metrics    MetricWriter (TensorBoard + metrics.jsonl), read_metrics
  validate   validate_config (fails at start, naming the field), per-stage config defaults
  registry   stage name -> "module:attribute"; `run(config, workdir)` dispatches

Stages import this package; it imports them only through the registry's strings.
"""
from apt2_jax.models.dit import unbox
from apt2_jax.train import data, registry
from apt2_jax.train.loop import (Stage, batch_shardings, global_batch, make_stage, pre_encode,
                                 state_shardings, train_and_evaluate)
from apt2_jax.train.metrics import MetricWriter, read_metrics
from apt2_jax.train.optim import (accumulate_gradients, apply_gradients, ema_update,
                                  learning_rate_schedule, make_optimizer, split_microbatches,
                                  unalias)
from apt2_jax.train.registry import ALL_STAGES, LOOP_STAGES, REGISTRY, run
from apt2_jax.train.step import COUNTERS, check_nonfinite, guarded_step, init_counters
from apt2_jax.train.validate import validate_config

__all__ = ["ALL_STAGES", "COUNTERS", "LOOP_STAGES", "MetricWriter", "REGISTRY", "Stage",
           "accumulate_gradients", "apply_gradients", "batch_shardings", "check_nonfinite", "data",
           "ema_update", "global_batch", "guarded_step", "init_counters", "learning_rate_schedule",
           "make_optimizer", "make_stage", "pre_encode", "read_metrics", "registry", "run",
           "split_microbatches", "state_shardings", "train_and_evaluate", "unalias", "unbox",
           "validate_config"]
