"""The testbed: every AAPT stage on the panorama world through the PCA codec (64 tokens of 32
values per latent frame), then the claims measured against the exact oracle
(`apt2_jax.configs.testbed`).

  # `make demo` (~20 min on 2 CPU cores): a smoke run of stage 1, the distilled and AAPT models.
  python -m apt2_jax.main --config=experiments/testbed.py:short --workdir=demo_out/testbed
  # Every stage and ablation, 2 noise seeds x 2 evaluation sets (~3.5 h on 2 CPU cores, estimated).
  python -m apt2_jax.main --config=experiments/testbed.py:full --workdir=runs/testbed_full
"""
from apt2_jax.configs import testbed


def get_config(arg: str = "short"):
  return testbed.get_config(arg)
