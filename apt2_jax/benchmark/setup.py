"""The model, mesh and shardings a measurement runs on (`Setup`, from a benchmark config)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from apt2_jax import sharding
from apt2_jax.models import CausalDiT, DiTConfig, init_params
from apt2_jax.models import vae as vae_lib
from apt2_jax.models.dit import unbox


@dataclasses.dataclass
class Setup:
  """Everything a measurement needs; arrays are placed with the shardings here."""
  config: Any                # the benchmark ConfigDict (`apt2_jax.configs.benchmark`)
  model_config: DiTConfig
  model: CausalDiT
  vae_config: vae_lib.VAEConfig  # `config.vae_size` (decode and first-frame figures)
  mesh: Any
  rules: tuple
  boxed: Any                 # abstract boxed params (logical axes)
  param_sharding: Any
  latent_hw: tuple           # (h, w) latent pixels
  tokens: int                # tokens per latent frame

  @property
  def abstract_params(self):
    """Unboxed `ShapeDtypeStruct`s of the parameters (no sharding)."""
    return unbox(self.boxed)

  def sharded_abstract_params(self):
    """The parameters as `ShapeDtypeStruct`s carrying their shardings (AOT inputs)."""
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        self.abstract_params, self.param_sharding)

  def batch_sharding(self, shape, sequence_dim=None):
    """Leading dim over (data, fsdp) when it divides; optionally one dim over `sequence`."""
    spec = [None] * len(shape)
    spec[0] = ("data", "fsdp")
    if sequence_dim is not None:
      spec[sequence_dim] = "sequence"
    return NamedSharding(self.mesh, sharding._fit(P(*spec), shape, self.mesh))

  def replicated(self):
    return sharding.replicated(self.mesh)

  def use_mesh(self):
    return sharding.use_mesh(self.mesh, self.rules)

  def text(self, batch, rng):
    """Random prompt: token ids [B, T] (models with a caption encoder) or embeddings [B, T, D]."""
    c = self.model_config
    if c.caption_vocab_size:
      return jax.random.randint(rng, (batch, self.config.text_len), 1, c.caption_vocab_size)
    return jax.random.normal(rng, (batch, self.config.text_len, c.text_dim)).astype(jnp.dtype(c.dtype))

  def text_shape(self, batch):
    return jax.eval_shape(lambda: self.text(batch, jax.random.key(0)))


def make_setup(config, devices=None) -> Setup:
  from apt2_jax.configs.benchmark import validate
  validate(config)
  mc = DiTConfig.from_dict(config.model)
  model = CausalDiT(mc)
  if devices is None:
    devices = sharding.config_devices(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config)
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0), boxed=True))
  p_shard = sharding.param_shardings(boxed, mesh, rules)
  h, w = config.height // vae_lib.SPATIAL_FACTOR, config.width // vae_lib.SPATIAL_FACTOR
  _, ph, pw = mc.patch_size
  return Setup(config, mc, model, vae_lib.vae_config(config.vae_size), mesh, rules, boxed, p_shard,
               (h, w), (h // ph) * (w // pw))


def init_sharded_params(s: Setup, seed: int):
  """Random DiT parameters drawn on the devices, already sharded (8B parameters never pass
  through one host)."""
  with s.use_mesh():
    return jax.jit(lambda k: init_params(s.model, k), out_shardings=s.param_sharding)(jax.random.key(seed))
