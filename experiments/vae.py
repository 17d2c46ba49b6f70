"""VAE stages: `vae` (train or fine-tune the causal VAE: L1 + KL, optional adversarial term) and
`vae_distill` (the paper's slim real-time decoder trained behind a frozen encoder).

Sizes (`apt2_jax.models.vae.vae_config`): `tiny` (tests), `small` (the toy pipeline), `wan`
(fine-tune Wan2.1's VAE: set `init_from` to its diffusers folder), `slim_decoder` (distillation;
set `teacher` to a diffusers `AutoencoderKLWan` folder or a `vae` workdir), `light_decoder` (the
light streaming decoder distilled behind a `small` VAE: set `teacher` to its workdir). Fields:
`apt2_jax/configs/vae.py`.

  # Toy pipeline: train the small VAE on the synthetic worlds.
  python -m apt2_jax.main --config=experiments/vae.py:small --workdir=/tmp/vae_small \\
      --config.data.source=pipeline
  # Slim decoder behind Wan2.1's encoder.
  python -m apt2_jax.main --config=experiments/vae.py:slim_decoder --workdir=/tmp/vae_slim \\
      --config.teacher=/path/to/Wan2.1-T2V-1.3B-Diffusers/vae --config.data.source=pipeline
  # The light streaming decoder (apt2_jax/models/light_decoder.py) behind a trained small VAE,
  # its speed at 256x256 and its PSNR against the full decoder, then streaming with it.
  python -m apt2_jax.main --config=experiments/vae.py:light_decoder --workdir=/tmp/light_decoder \
      --config.teacher=/tmp/vae_small
  python -m apt2_jax.benchmark_decoder --teacher=/tmp/vae_small --decoder=/tmp/light_decoder
  python -m apt2_jax.inference.sample --checkpoint=RUN --decoder=/tmp/light_decoder
  # A random-data smoke run (no dataset needed).
  python -m apt2_jax.main --config=experiments/vae.py:tiny --workdir=/tmp/vae_tiny
"""
from apt2_jax.configs import vae


def get_config(arg: str = "small"):
  return vae.get_config(arg)
