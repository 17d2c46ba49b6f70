"""The configs' building blocks: model sizes and the stage, pipeline and benchmark builders.

The files in `experiments/` are thin, readable entry points (`--config=experiments/<stage>.py:<arg>`)
that call these builders; they import `apt2_jax.configs` and never each other, so every config
works from any directory once the package is installed. The library (benchmark, demo, serve)
imports the builders from here, never from `experiments/`.

  sizes          model sizes (`model_config`, `SIZES`), `mesh_config`, `logical_rules`
  diffusion      stages 0-2: `base_config`, `parse_arg`, `CONTROL_DIM`, pretrain/adapt/distill
  adversarial    stage 3: `adversarial_config`, `long_video_config` (and their blocks)
  control        the camera/pose control chains over every stage (`chain_config`)
  vae            the `vae` / `vae_distill` stage configs
  toy_pipeline   the whole toy chain (VAE, stages 0-3, ablations, evaluation)
  benchmark      the benchmark's config and its validation

Each builder module is importable without JAX.
"""
