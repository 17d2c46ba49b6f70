"""The toy pipeline: VAE, stages 0-3, long video and the ablations on the synthetic camera world,
each stage starting from the previous one's checkpoint, then the evaluation against the oracle.
The variants' settings: `apt2_jax/configs/toy_pipeline.py`.

Variants (the config argument):
  tiny  the end-to-end test: tiny 1-block model on 1 device, 32x32 pixels, 1-3 steps per stage
        (measured: ~2 min on 2 idle CPU cores, ~3.5 min in `make test` beside the other worker;
        nearly all of it XLA compiles: 8 stage steps, their initialisations, the evaluation)
  demo  `make demo`: the `toy` DiT (4 blocks, width 128), small VAE (base width 16), 64x64 pixels,
        tens of steps per stage: measured 8-10 min on 2 CPU cores (VAE 2.5-4 min); a smoke run of the
        whole chain, far too short to learn the world
  full  the same models trained for thousands of steps, evaluated on 2 held-out worlds with 1- and
        5-minute rollouts: ~75 minutes on 2 CPU cores (VAE 11, DiT stages ~40, evaluation 22);
        results in README.md and docs/toy_full/

  python -m apt2_jax.main --config=experiments/toy_pipeline.py:demo --workdir=demo_out/pipeline
  python -m apt2_jax.main --config=experiments/toy_pipeline.py:full --workdir=runs/toy_full
"""
from apt2_jax.configs import toy_pipeline


def get_config(arg: str = "demo"):
  return toy_pipeline.get_config(arg)
