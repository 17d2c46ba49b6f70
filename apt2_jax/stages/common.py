"""Pieces shared by the diffusion-family stages (0, 1, 2; stage 3 reuses them).

  LatentInputs     batch -> (latents [B, F, h, w, C], controls [B, F, h, w, Cc] | None, text)
                   through the frozen VAE (or latents straight from the batch)
  caption_dropout  replace a clip's tokens by padding so the model also learns p(x) (for CFG)
  merge_pretrained `config.init_from` parameters into fresh ones, widening the patch embedding
  stream_sample    first frame + controls -> generated latents, through `generation.stream`
                   (1-NFE generator or the diffusion baseline's Euler sampler, with guidance)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from apt2_jax import checkpointing, sharding
from apt2_jax import controls as encodings
from apt2_jax.generation import stream
from apt2_jax.generation import vae as generation_vae
from apt2_jax.models import DiTConfig
from apt2_jax.models import vae as vae_lib
from apt2_jax.rollout import RolloutOptions
from apt2_jax.train import data as train_data


# ================================================================================================
# Frozen VAE and per-latent-frame controls
# ================================================================================================

def load_vae(config, mesh):
  """(VAE module, replicated variables) for `config.vae`; None when the batch holds latents."""
  if config.data.source == "random_latents":
    return None, {}
  checkpoint = config.vae.get("checkpoint", "")
  if checkpoint:  # a `vae` / `vae_distill` workdir or a diffusers AutoencoderKLWan folder
    model, params = generation_vae.load_vae(checkpoint)
    vae_cfg = model.config
  else:
    vae_cfg = generation_vae.vae_config_from_block(config.vae)
    if vae_cfg.codec == "learned":  # the pixel codec has no parameters to train
      logging.warning("config.vae.checkpoint is empty: encoding with a RANDOMLY initialised %r VAE "
                      "(smoke tests only; train one with experiments/vae.py)", config.vae.size)
    params = vae_lib.init_params(vae_lib.VAE(vae_cfg), jax.random.key(0))
  if vae_cfg.z_dim != config.model.latent_channels:
    raise ValueError(f"config.model.latent_channels={config.model.latent_channels} does not match "
                     f"the VAE's z_dim={vae_cfg.z_dim} (config.vae)")
  return vae_lib.VAE(vae_cfg), jax.device_put(params, sharding.replicated(mesh))


def latent_controls(controls, latent_frames: int, height: int, width: int, encoding: str = "raw"):
  """Per-video-frame controls `[B, T, D]` -> per-latent-pixel controls `[B, F, h, w, Cc]`.

  `apt2_jax.controls.latent_control_maps`: the 4 controls of latent frame j's video frames 4j-3 .. 4j,
  raw (Cc = 4 D, broadcast over pixels) or as camera ray maps (`encoding="rays"`, Cc = 24);
  latent frame 0 (the first image) has no motion: zeros.
  """
  return encodings.latent_control_maps(controls, latent_frames, height, width, encoding)


class LatentInputs:
  """Turns a batch into model inputs; holds the frozen VAE (in `frozen['vae']`)."""

  def __init__(self, config, mesh):
    self.config = config
    self.vae, self.vae_params = load_vae(config, mesh)
    self.model_config = DiTConfig.from_dict(config.model)
    control_dim = int(config.data.get("control_dim", 0))
    self.control_encoding = config.data.get("control_encoding", "raw")
    want = encodings.control_channels(self.control_encoding, control_dim) if control_dim else 0
    if self.model_config.control_channels not in (0, want):
      raise ValueError(f"config.model.control_channels={self.model_config.control_channels} must be 0 or "
                       f"4 x config.data.control_dim = {want}")

  @property
  def frozen(self):
    return {"vae": self.vae_params} if self.vae is not None else {}

  @property
  def loss_weights(self):
    """Per-channel weights of the latent MSE losses (`vae.latent_loss_weights`), or None."""
    return vae_lib.latent_loss_weights(self.vae.config if self.vae is not None else None)

  def encode(self, frozen, video):
    """Video `[B, T, H, W, 3]` (uint8, or float in [-1, 1]) -> normalised latents (the VAE mean)."""
    video = video.astype(jnp.float32) / 127.5 - 1.0 if video.dtype == jnp.uint8 else video.astype(jnp.float32)
    mean, _ = self.vae.apply(frozen["vae"], video, method=vae_lib.VAE.encode)
    return jax.lax.stop_gradient(vae_lib.normalize_latents(mean, self.vae.config))

  def __call__(self, frozen, batch):
    """-> (latents [B, F, h, w, C] float32, controls [B, F, h, w, Cc] or None, text tokens)."""
    if "latents" in batch:
      latents = batch["latents"].astype(jnp.float32)
    else:
      latents = self.encode(frozen, batch["video"])
    controls = None
    if self.model_config.control_channels:
      _, f, h, w, _ = latents.shape
      controls = latent_controls(batch["controls"].astype(jnp.float32), f, h, w, self.control_encoding)
    return latents, controls, batch["text_tokens"]


def caption_dropout(rng, tokens, rate: float):
  """Replaces each clip's tokens by all-padding tokens with probability `rate`."""
  if rate <= 0:
    return tokens
  drop = jax.random.bernoulli(rng, rate, (tokens.shape[0],))
  drop = drop.reshape((-1,) + (1,) * (tokens.ndim - 1))  # token ids [B, L] or embeddings [B, L, D]
  return jnp.where(drop, jnp.zeros_like(tokens), tokens)


# ================================================================================================
# init_from: load another stage's parameters, widening the input projection
# ================================================================================================

PATCH_KERNEL = ("patch_embedding", "kernel")


def patch_channel_layout(c: DiTConfig) -> dict[str, tuple[int, int]]:
  """Input channel ranges of the patch embedding: noise, recycled (optional), control."""
  out, start = {"noise": (0, c.latent_channels)}, c.latent_channels
  if c.recycled_channels:
    out["recycled"] = (start, start + c.latent_channels)
    start += c.latent_channels
  out["control"] = (start, start + c.control_channels)
  return out


def merge_pretrained(fresh, loaded, new_config: DiTConfig, old_config: DiTConfig | None,
                     source: str = "config.init_from"):
  """Fresh parameters with every entry replaced by `loaded`'s; checks names and shapes.

  The patch embedding may be widened: when the loaded model had no recycled channels (stage 0,
  Wan2.1) or other control channels, its noise (and matching) input channels are copied and the
  new ones keep their fresh random initialisation (the paper's choice, not zeros).
  Raises ValueError naming every missing or mismatched parameter.
  """
  flat_new = traverse_util.flatten_dict(fresh)
  flat_old = traverse_util.flatten_dict(loaded)
  missing = sorted("/".join(k) for k in flat_new if k not in flat_old)
  unexpected = sorted("/".join(k) for k in flat_old if k not in flat_new)
  mismatched = sorted(f"{'/'.join(k)}: checkpoint {tuple(flat_old[k].shape)} vs model {tuple(v.shape)}"
                      for k, v in flat_new.items()
                      if k in flat_old and tuple(flat_old[k].shape) != tuple(v.shape) and k != PATCH_KERNEL)
  if missing or mismatched:
    raise ValueError(f"{source}: cannot load parameters; missing in the checkpoint: {missing or 'none'}; "
                     f"shape mismatches: {mismatched or 'none'}")
  if unexpected:
    logging.warning("%s: ignoring checkpoint parameters the model lacks: %s", source, unexpected)
  out = {}
  for k, v in flat_new.items():
    old = flat_old[k]
    if k == PATCH_KERNEL and tuple(old.shape) != tuple(v.shape):
      out[k] = _widen_patch_kernel(v, old, new_config, old_config, source)
    else:
      out[k] = old.astype(v.dtype) if hasattr(old, "astype") else old
  return traverse_util.unflatten_dict(out)


def _widen_patch_kernel(fresh, old, new_config, old_config, source):
  if old_config is None:
    raise ValueError(f"{source}: patch_embedding kernel {tuple(old.shape)} differs from the model's "
                     f"{tuple(fresh.shape)} and the checkpoint's model config is unknown")
  new_l, old_l = patch_channel_layout(new_config), patch_channel_layout(old_config)
  if tuple(old.shape[:3]) != tuple(fresh.shape[:3]) or old.shape[-1] != fresh.shape[-1]:
    raise ValueError(f"{source}: patch_embedding kernel {tuple(old.shape)} cannot widen to {tuple(fresh.shape)}")
  copied, kernel = [], fresh
  for part, (a, b) in new_l.items():
    if part in old_l and (old_l[part][1] - old_l[part][0]) == b - a and b > a:
      oa, ob = old_l[part]
      kernel = jax.jit(lambda k, o, a=a, b=b, oa=oa, ob=ob: k.at[..., a:b, :].set(o[..., oa:ob, :].astype(k.dtype)),
                       out_shardings=getattr(fresh, "sharding", None))(kernel, old)
      copied.append(part)
  logging.info("%s: widened patch_embedding %s -> %s; copied %s, new channels randomly initialised",
               source, tuple(old.shape), tuple(fresh.shape), copied)
  return kernel


def load_pretrained_params(config, fresh_params, path: str, key: str, source: str):
  """Loads `path`'s `key` parameters onto the fresh parameters' shardings and merges them.

  `path`: a training workdir (any DiT stage), or a diffusers Wan2.1 folder (`transformer/` or the
  whole pipeline folder; `apt2_jax.convert.wan_dit.import_for_config`: the architecture must be
  `config.model`'s, the patch embedding is widened for the recycled and control channels, and the
  conversion report is logged). `key` applies to workdirs only.
  """
  from apt2_jax.convert import wan_dit  # pylint: disable=g-import-not-at-top
  if wan_dit.is_diffusers_dit(path):
    return _load_diffusers_dit(config, fresh_params, path, source)
  flat_sh = {k: v.sharding for k, v in traverse_util.flatten_dict(fresh_params).items()}
  flat_shape = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(fresh_params).items()}
  mesh = next(iter(flat_sh.values())).mesh

  def where(path_, shape):  # the target layout where the shape agrees, else replicated
    return flat_sh[path_] if flat_shape.get(path_) == shape else sharding.replicated(mesh)

  loaded, saved = checkpointing.load_params(path, key=key, shardings=where)
  old_config = DiTConfig.from_dict(saved.model) if "model" in saved else None
  return merge_pretrained(fresh_params, loaded, DiTConfig.from_dict(config.model), old_config, source)


def _load_diffusers_dit(config, fresh_params, path: str, source: str):
  """A diffusers WanTransformer3DModel folder -> the run's parameters, on their shardings."""
  from apt2_jax.convert import wan_dit  # pylint: disable=g-import-not-at-top
  model_config = DiTConfig.from_dict(config.model)
  rng = jax.random.fold_in(jax.random.key(int(config.get("seed", 0))), 0x3A7)
  folder = wan_dit.resolve_folder(path)
  try:
    loaded, report = wan_dit.import_for_config(folder, model_config, rng)
  except ValueError as e:
    raise ValueError(f"{source}={path!r}: {e}") from None
  logging.info("%s: imported the diffusers Wan transformer %s; conversion report:\n%s", source, folder, report)
  flat_fresh = traverse_util.flatten_dict(fresh_params)
  flat = {k: jax.device_put(np.asarray(v, np.dtype(flat_fresh[k].dtype)), flat_fresh[k].sharding)
          for k, v in traverse_util.flatten_dict(loaded).items() if k in flat_fresh}
  return merge_pretrained(fresh_params, traverse_util.unflatten_dict(flat), model_config, model_config, source)


# ================================================================================================
# Streaming samples through the rollout (eval), with classifier-free guidance
# ================================================================================================

def stream_sample(model_config: DiTConfig, params, first_frame, text, controls, noise,
                  options: RolloutOptions, guidance: float = 1.0):
  """Generates `S` latent frames after `first_frame` through `generation.stream.generate` (the
  path every generator uses; guidance included).

  Args:
    first_frame: [B, 1, h, w, C]; text: int32 [B, L] tokens; controls: the encoded control input of
    the generated frames [B, S, h, w, Cc] or None; noise: [B, S, h, w, C].
  Returns:
    frames [B, S, h, w, C].
  """
  spec = stream.StreamSpec(model_config, None, options, float(guidance))
  return stream.generate(spec, params, first_frame, text, None, noise, control_maps_=controls)


def rollout_metrics(frames, target):
  """Latent MSE of a streamed clip against the ground truth: mean, first and last frame (drift)."""
  err = jnp.mean(jnp.square(frames - target), axis=(0, 2, 3, 4))  # [S]
  return {"rollout_mse": jnp.mean(err), "rollout_mse_first": err[0], "rollout_mse_last": err[-1]}


class EvalBatch:
  """A fixed validation batch (the first of the validation split), as global arrays."""

  def __init__(self, config, mesh):
    batch_size = int(config.get("eval", {}).get("batch_size", 0) or config.batch_size)
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(ways, batch_size // ways * ways)
    it = train_data.make_iterator(config, "validation", batch_size=batch_size)
    local = next(it)
    shardings = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in local.items()}
    self.batch = {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
                  for k, v in local.items()}
