"""Streaming VAE decode latency per latent frame (4 video frames): `generation.stream.decode`.

  python -m apt2_jax.tools.benchmark_vae --sizes=wan,slim_decoder --height=256 --width=256 \
      --json_out=/tmp/vae_decode.json

The decode every stream runs (`generation.stream.decode`: denormalise, the causal decoder's
streaming step, uint8), jitted as `generation.stream.compiled` jits it, timed with the
benchmark's `timing`. Random parameters (latency does not depend on their values). Reports, per
size, the compile times of the two variants (first latent frame, later frames) and the median /
min latency of `--steps` later steps, in milliseconds, plus frames per second of decoded video.
`python -m apt2_jax.benchmark` reports the same decode as `decode_latency_ms`.
"""
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from apt2_jax.benchmark import timing
from apt2_jax.generation import stream
from apt2_jax.models import DiTConfig
from apt2_jax.models import vae as vae_lib

_SIZES = flags.DEFINE_list("sizes", ["wan", "slim_decoder"], "VAE sizes to time.")
_HEIGHT = flags.DEFINE_integer("height", 256, "Video height (multiple of 8).")
_WIDTH = flags.DEFINE_integer("width", 256, "Video width (multiple of 8).")
_BATCH = flags.DEFINE_integer("batch", 1, "Streams decoded together.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed later-frame steps.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results here as JSON.")


def benchmark(size: str, height: int, width: int, batch: int, steps: int, dtype) -> dict:
  cfg = vae_lib.vae_config(size, dtype=dtype)
  # The decode reads only the spec's VAE; the DiT config just has to fit its latent channels.
  decode = stream.compiled(stream.StreamSpec(DiTConfig(latent_channels=cfg.z_dim), cfg)).decode
  model = vae_lib.VAE(cfg)
  params = vae_lib.init_params(model, jax.random.key(0), 16, 16)
  h, w = height // vae_lib.SPATIAL_FACTOR, width // vae_lib.SPATIAL_FACTOR
  z = jax.random.normal(jax.random.key(1), (batch, 1, h, w, cfg.z_dim), jnp.float32)

  t = time.perf_counter()
  out, cache = timing.block(decode(params, vae_lib.init_decode_cache(model, batch, h, w), z, first=True))
  first_s = time.perf_counter() - t
  t = time.perf_counter()
  out, cache = timing.block(decode(params, cache, z))
  compile_s = time.perf_counter() - t
  assert out.shape == (batch, vae_lib.TEMPORAL_FACTOR, height, width, 3), out.shape
  times, _ = timing.carry_times_ms(lambda c: decode(params, c, z)[1], cache, reps=steps)
  median = statistics.median(times) / 1e3
  n_params = sum(x.size for x in jax.tree.leaves(params["params"]["decoder"]))
  return {
      "size": size, "height": height, "width": width, "batch": batch, "dtype": str(dtype.__name__),
      "device": str(jax.devices()[0].device_kind), "decoder_params": int(n_params),
      "first_frame_compile_and_run_s": first_s, "later_frame_compile_and_run_s": compile_s,
      "latency_ms_per_latent_frame_median": 1e3 * median,
      "latency_ms_per_latent_frame_min": min(times),
      "video_fps": batch * vae_lib.TEMPORAL_FACTOR / median, "steps": steps,
  }


def main(argv):
  del argv
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  results = []
  for size in _SIZES.value:
    r = benchmark(size, _HEIGHT.value, _WIDTH.value, _BATCH.value, _STEPS.value, dtype)
    print(json.dumps(r), flush=True)
    results.append(r)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
