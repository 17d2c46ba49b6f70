"""Does a VAE beat the trivial references on a world? Its reconstruction against a flat colour.

  python -m apt2_jax.tools.vae_references --vae=runs/toy_full/vae --world=camera --pixels=64 \
      --worlds=2 --seconds=4 --json_out=/tmp/vae_references.json

Every model the evaluation scores is decoded by its VAE, so the VAE's reconstruction of the oracle
(the "oracle" reference through the codec) bounds them all; if it does not beat frame 0's flat
mean colour by a clear margin (`references.VAE_MARGIN_DB`), the evaluation cannot tell a model that
draws the world from one that paints a flat colour. Per evaluation set (`oracle.default_eval_sets`,
the same worlds and trajectories `apt2_jax.evaluation` uses), per world, whole-frame PSNR of the
references through the codec (`references.reference_curves`: the ceiling, the flat colour, the true
frame one latent step back) and of an 8x average pool of each frame upsampled back (a fixed low-pass
that keeps 1/64 of the pixels per frame: what a lossy code of about the VAE's size can reach without
learning). Means over the generated video frames; the set's margin is the mean VAE PSNR minus the
mean flat PSNR (`references.vae_vs_flat`).
"""
from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import numpy as np

from apt2_jax.data import worlds as worlds_lib
from apt2_jax.evaluation import oracle as oracle_lib
from apt2_jax.evaluation import references as refs_lib
from apt2_jax.evaluation.metrics import psnr

POOL = 8  # the average-pool reference's factor (the VAE's spatial factor)


def average_pool(frames: np.ndarray, factor: int = POOL) -> np.ndarray:
  """Each frame `[T, H, W, 3]` (uint8) average-pooled by `factor` and upsampled back (nearest)."""
  t, h, w, c = frames.shape
  if h % factor or w % factor:
    raise ValueError(f"frames of {h}x{w} do not divide by the pool factor {factor}")
  pooled = frames.astype(np.float32).reshape(t, h // factor, factor, w // factor, factor, c).mean((2, 4))
  return np.round(pooled.repeat(factor, 1).repeat(factor, 2)).astype(np.uint8)


class _VAE:
  """What `references.codec_roundtrip` needs of a model: `vae_config`, `vae_params`."""

  def __init__(self, path: str):
    from apt2_jax.generation.vae import load_vae
    model, self.vae_params = load_vae(path)
    self.vae_config = model.config


def score(vae, world: str = "camera", pixels: int = 64, num_worlds: int = 2, seconds: float = 4.0,
          fps: float = 24.0) -> dict:
  """{"sets": {set: `references.vae_vs_flat` + "avgpool_psnr", its "worlds" rows with the true frame
  one latent step back and the average pool}} for `vae` (anything with `vae_config` and `vae_params`)."""
  n = 1 + refs_lib.FRAMES_PER_LATENT * max(1, int(round(seconds * fps / refs_lib.FRAMES_PER_LATENT)))
  out = {"world": world, "pixels": pixels, "video_frames": n, "fps": fps, "threshold_db": refs_lib.VAE_MARGIN_DB,
         "sets": {}}
  roundtrip = refs_lib.codec_roundtrip(vae)
  mean = lambda c: float(np.mean(np.asarray(c["psnr"])[1:]))
  for eval_set in oracle_lib.default_eval_sets(world):
    env = oracle_lib.make_env(world, eval_set, pixels, pixels, n)
    rows, curves = [], []
    for tw in oracle_lib.eval_worlds(env, eval_set, num_worlds, n, fps):
      target = oracle_lib.make_target(env, tw, [1])
      curves.append(refs_lib.reference_curves(target, 1, roundtrip))
      rows.append({"seed": int(tw.seed), "trajectory": tw.trajectory,
                   "one_step_back_psnr": mean(curves[-1]["one_step_back"]),
                   "avgpool_psnr": float(np.mean(psnr(average_pool(target.oracle), target.oracle)[1:]))})
    s = refs_lib.vae_vs_flat([c["oracle"] for c in curves], [c["flat_colour"] for c in curves])
    for row, w in zip(rows, s.pop("worlds")):
      row.update(w)
    s.update(worlds=rows, avgpool_psnr=float(np.mean([r["avgpool_psnr"] for r in rows])))
    out["sets"][eval_set.name] = s
  return out


FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags only when run as a program, so that importing this module
  (a test, another CLI) defines nothing."""
  flags.DEFINE_string("vae", None, "A `vae` stage workdir or a diffusers AutoencoderKLWan folder.")
  flags.DEFINE_enum("world", "camera", list(worlds_lib.WORLD_NAMES), "The world.")
  flags.DEFINE_integer("pixels", 64, "Frame height and width (multiple of 8).")
  flags.DEFINE_integer("worlds", 2, "Worlds per evaluation set.")
  flags.DEFINE_float("seconds", 4.0, "Video length per world at 24 fps.")
  flags.DEFINE_string("json_out", None, "Write the result here as JSON.")


def main(argv):
  del argv
  if not FLAGS.vae:
    raise app.UsageError("--vae is required (a vae stage workdir or a diffusers AutoencoderKLWan folder)")
  t0 = time.time()
  result = score(_VAE(FLAGS.vae), FLAGS.world, FLAGS.pixels, FLAGS.worlds, FLAGS.seconds)
  result.update(vae=FLAGS.vae, seconds=time.time() - t0)
  for name, s in result["sets"].items():
    print(f"{name:16s} VAE {s['vae_psnr']:.2f} dB, flat colour {s['flat_psnr']:.2f}, margin {s['margin_db']:+.2f} "
          f"(clear >= {refs_lib.VAE_MARGIN_DB:g}: {s['clear_margin']}); {POOL}x average pool {s['avgpool_psnr']:.2f}",
          flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
