"""Test setup: 8 virtual CPU devices so that sharding is exercised for real.

This must run before any JAX backend is initialised, hence at conftest import time.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many small programs and run each a few times: cheap XLA CPU compiles (see
# apt2_jax/xla_flags.py; the stage-3 train step compiles in 8 s instead of 23 s). The repository
# root goes on sys.path first: for that module and for `tests.*` helpers (the configs of
# `experiments/` are loaded by path: tests/config_files.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from apt2_jax import xla_flags  # noqa: E402  (does not import jax)

os.environ["XLA_FLAGS"] = xla_flags.with_cheap_cpu_compile(os.environ.get("XLA_FLAGS"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)

# The per-user persistent compilation cache every command uses (apt2_jax/runtime.py): a rerun of
# the suite loads the programs it compiled before. APT2_COMPILATION_CACHE=off (or a directory)
# applies here too; modules that measure caching point JAX at their own temporary cache.
from apt2_jax import runtime  # noqa: E402

runtime.enable_compilation_cache(runtime.cache_dir_setting())

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
  assert len(jax.devices()) == 8, jax.devices()
  return jax.devices()


@pytest.fixture(scope="session")
def tiny_dit():
  """(model, params, config) of the tiny causal DiT with 2 control channels, float32."""
  from apt2_jax.configs import sizes
  from apt2_jax.models import CausalDiT, DiTConfig, init_params
  config = DiTConfig.from_dict(sizes.model_config("tiny", control_channels=2, caption_vocab_size=0))
  model = CausalDiT(config)
  params = init_params(model, jax.random.key(0))
  return model, params, config
