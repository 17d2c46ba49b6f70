"""The toy pipeline: VAE, stages 0-3, long video and the ablations on the synthetic camera world,
each stage starting from the previous one's checkpoint, then the evaluation against the oracle on
two sets (in-distribution worlds: the metrics; held-out worlds: generalisation) with references
through the same VAE. The variants' settings and timings: `apt2_jax/configs/toy_pipeline.py`.

Variants (the config argument):
  tiny  the end-to-end test: tiny 1-block model on 1 device, 32x32 pixels, 1-3 steps per stage
  demo  `make demo-camera`: the `toy` DiT (4 blocks, width 128), small VAE trained on the DiT's
        17-frame clips, 64x64 pixels, tens of steps per stage: a smoke run of the whole chain
  full  the same models trained for thousands of steps (the VAE 2000, enough to beat frame 0's flat
        colour by the clear margin in distribution), evaluated on 2 worlds per set with 1- and
        5-minute rollouts: estimated ~145 minutes on 2 CPU cores (not measured end to end)

  python -m apt2_jax.main --config=experiments/toy_pipeline.py:demo --workdir=demo_out/pipeline
  python -m apt2_jax.main --config=experiments/toy_pipeline.py:full --workdir=runs/toy_full
"""
from apt2_jax.configs import toy_pipeline


def get_config(arg: str = "demo"):
  return toy_pipeline.get_config(arg)
