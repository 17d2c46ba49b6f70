"""The light streaming decoder (`apt2_jax/models/light_decoder.py`), distilled from a trained VAE's
full decoder behind its frozen encoder (stage `vae_distill`; fields: `apt2_jax/configs/vae.py`).

  # 1. A teacher: the small VAE on the camera world.
  python -m apt2_jax.main --config=experiments/vae.py:small --workdir=/tmp/vae_small \\
      --config.data.source=worlds
  # 2. The light decoder behind it (its encoder and latent statistics are the teacher's).
  python -m apt2_jax.main --config=experiments/light_decoder.py --workdir=/tmp/light_decoder \\
      --config.teacher=/tmp/vae_small
  # 3. Stream with it: the generator's VAE keeps its encoder, the decoder is swapped.
  python -m apt2_jax.inference.sample --checkpoint=RUN --decoder=/tmp/light_decoder
  # Speed (ms per latent frame at 256x256, full vs light) and PSNR against the full decoder.
  python -m apt2_jax.benchmark_decoder --teacher=/tmp/vae_small --decoder=/tmp/light_decoder

The argument is the VAE size name of `apt2_jax/configs/vae.py` (default `light_decoder`).
"""
from apt2_jax.configs import vae


def get_config(arg: str = "light_decoder"):
  return vae.get_config(arg or "light_decoder")
