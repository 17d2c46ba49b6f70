"""Training stages: one trainer per stage family, each a `train.Stage` run by the shared loop.

  vae          `vae`, `vae_distill`: the causal VAE and its decoder-only distillation
  diffusion    `pretrain` (stage 0), `adapt` (stage 1)
  distill      `distill` (stage 2)
  adversarial  `adversarial` (stage 3)
  long_video   `long_video` (stage 3b: segments against unpaired real short clips)
  common       frozen-VAE inputs, init_from merging, guided streaming samples (eval)

Which module runs which `config.stage` is listed once, in `apt2_jax.train.registry`.
"""
