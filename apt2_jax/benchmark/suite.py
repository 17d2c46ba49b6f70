"""`run(config)`: every benchmark figure of one config, as one JSON-ready dict."""
from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging

from . import streaming, training
from .setup import init_sharded_params, make_setup
from .timing import VIDEO_FRAMES_PER_LATENT, peak_flops


def run(config, inspect=None) -> dict:
  """All benchmark figures for `config` (an `apt2_jax.configs.benchmark` config) as a dict.

  `inspect` (`programs.Inspect`): also profile the steady-state programs and dump their cost
  analyses."""
  s = make_setup(config)
  mc = s.model_config
  devices = s.mesh.devices
  result = dict(
      device_kind=devices.flat[0].device_kind, platform=devices.flat[0].platform,
      device_count=int(devices.size), jax_version=jax.__version__,
      mesh={k: int(v) for k, v in s.mesh.shape.items()}, size=config.size,
      config=json.loads(config.to_json_best_effort()),
      batch=config.batch, resolution=f"{config.width}x{config.height}",
      latent=f"{s.latent_hw[1]}x{s.latent_hw[0]}", tokens_per_frame=s.tokens, window=mc.window,
      params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_params))),
      dtype=mc.dtype, xla_flags=os.environ.get("XLA_FLAGS", ""))
  t0 = time.perf_counter()
  progress = lambda what: logging.info("[benchmark %6.0f s] %s", time.perf_counter() - t0, what)
  progress(f"{config.size}: {result['params']:,} parameters on {result['device_count']} "
           f"{result['platform']} device(s); measuring peak FLOP/s")
  peak, source = peak_flops(s.mesh, mc.dtype, config.peak_matmul)
  result.update(peak_flops=peak, peak_source=source)
  params = init_sharded_params(s, config.seed)
  progress("streaming: cached step, latency growth, no-cache recompute, peer block")
  result.update(streaming.streaming_figures(s, params, peak, progress, inspect))
  result["fps"] = VIDEO_FRAMES_PER_LATENT / ((result["step_latency_ms"] + result["decode_latency_ms"]) / 1e3)
  result["fps_dit_only"] = VIDEO_FRAMES_PER_LATENT / (result["step_latency_ms"] / 1e3)
  if config.train.enabled:
    del params  # the training figures run on the stages' own states
    progress("training: the stage-1 and stage-3 trainers' steps (compile, then timed)")
    result.update(training.training_figures(s, peak, inspect))
  progress("done")
  if inspect is not None:
    inspect.log_where()
  return result
