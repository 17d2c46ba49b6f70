"""Training figures: the stages' own train steps, timed as the training loop runs them.

  stage 1  `apt2_jax.stages.diffusion` (stage "adapt"): teacher-forced rectified flow over the
           block-causal clip, with the stage's optimiser, gradient clipping, caption dropout and EMA
  stage 3  `apt2_jax.stages.adversarial`: the student-forcing rollout, the discriminator with its
           per-frame heads, approximated R1/R2, both optimisers and the EMA (1 D + 1 G update)

Each goes through the stage's public interface, `make_stage(config, mesh)` with its config from
`apt2_jax.configs` (the benchmark's model, mesh and clip length; random latents), and is jitted as
the loop jits it: `train.guarded_step(stage, seed)` with the state's shardings, the state donated.
Figures: step time, tokens/s per device (generated tokens for stage 3), MFU (model FLOPs, remat
not counted) and peak bytes per device from `memory_analysis()`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from apt2_jax import flops, sharding, train
from apt2_jax.configs import adversarial as adversarial_config
from apt2_jax.configs import diffusion as diffusion_config
from apt2_jax.configs import sizes
from apt2_jax.models.dit import unbox

from .setup import Setup
from .timing import memory_bytes, time_carry_ms

STAGES = ("stage1", "stage3")  # the timed figures; `stage_step` also builds "long_video"
DESCRIPTION = {
    "stage1": "stages/diffusion.py (adapt): teacher-forced flow loss, AdamW, grad clip, EMA",
    "stage3": "stages/adversarial.py: 1 D update (4 clips: real, fake, perturbed) + 1 G update",
}


def stage_config(s: Setup, name: str, batch: int, frames: int, options: dict | None = None) -> ml_collections.ConfigDict:
  """The stage's own config (`apt2_jax.configs`) for the benchmark's model, mesh and rules, on
  random latent clips of `frames` teacher-forced (stage 1) or generated (stage 3, long video: all
  segments) latent frames; `options`: {dotted config field: value} set last (e.g.
  `adversarial.g_sharding`, `long_video.segment_frames`)."""
  c = s.config
  base = c.size if c.size in sizes.SIZES else "small"
  if name == "stage1":
    cfg = diffusion_config.adapt_config(base)
    cfg.model = ml_collections.ConfigDict(c.model.to_dict())
    cfg.flow.shift = float(c.train.shift)
  elif name in ("stage3", "long_video"):
    cfg = (adversarial_config.adversarial_config if name == "stage3" else adversarial_config.long_video_config)(base)
    cfg.model = ml_collections.ConfigDict(c.model.to_dict())
    cfg.adversarial.rollout_remat = c.train.remat
    # D's block-causal passes over 4 clips (real, fake, perturbed) dominate the step's memory: its
    # blocks are rematerialised like the rollout's (small, 256x256, 8 frames: 31 GB of temporaries
    # without, 3.9 GB with).
    cfg.model.remat_policy = c.train.remat
  else:
    raise ValueError(f"unknown training figure {name!r}; choose one of {STAGES}")
  cfg.model.recycled_channels = True
  cfg.model.control_channels = 0
  cfg.data.update(dict(source="random_latents", height=int(c.height), width=int(c.width),
                       frames=1 + 4 * frames, control_dim=0, text_len=int(c.text_len)))
  if not s.model_config.caption_vocab_size:
    # Text as embeddings [B, T, D]: `stages.common.caption_dropout` broadcasts its [B, 1] mask
    # against [B, T, D] (fails for B > 1), so these models train without caption dropout here.
    cfg.caption_dropout = 0.0
  cfg.batch_size = batch
  cfg.microbatches = 1
  cfg.mesh = ml_collections.ConfigDict(dict(c.mesh))
  cfg.logical_rules = tuple(c.logical_rules)
  cfg.seed = int(c.seed)
  for key, value in (options or {}).items():
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  if name == "long_video":
    lv = cfg.long_video
    if frames != lv.segment_frames * lv.num_segments:
      raise ValueError(f"long_video: {frames} frames is not segment_frames {lv.segment_frames} x num_segments "
                       f"{lv.num_segments}")
  return cfg


@dataclasses.dataclass
class StageStep:
  """One stage's jitted guarded train step and its sharded abstract inputs."""
  name: str
  config: Any
  stage: Any               # the `train.Stage` from the stage module's `make_stage`
  fn: Any                  # jit(guarded_step)(state, frozen, batch) -> (state, metrics)
  state: Any               # abstract state, `ShapeDtypeStruct`s with shardings
  batch: Any               # abstract batch {"latents", "text_tokens"}, with shardings
  init: Callable           # seed -> a random state on the mesh (`stage.init_state`)

  @property
  def args(self):
    return self.state, self.stage.frozen, self.batch


def stage_step(s: Setup, name: str, batch: int, frames: int, options: dict | None = None) -> StageStep:
  """`batch` rows of `frames` + 1 latent frames (long video: rollout conditions and real clips
  alternate, `batch` / 2 rollouts)."""
  from apt2_jax.stages import adversarial, diffusion, long_video
  make_stage = {"stage1": diffusion.make_stage, "stage3": adversarial.make_stage,
                "long_video": long_video.make_stage}[name]
  cfg = stage_config(s, name, batch, frames, options)
  stage = make_stage(cfg, s.mesh)
  abstract, shardings = train.state_shardings(stage, s.mesh, s.rules, jax.random.key(0))
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
  text = s.text_shape(batch)
  lat = (batch, frames + 1, *s.latent_hw, s.model_config.latent_channels)
  b = {"latents": jax.ShapeDtypeStruct(lat, jnp.float32, sharding=s.batch_sharding(lat)),
       "text_tokens": jax.ShapeDtypeStruct(text.shape, text.dtype, sharding=s.batch_sharding(text.shape))}
  fn = jax.jit(train.guarded_step(stage, cfg.seed),
               in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, stage.frozen),
                             jax.tree.map(lambda x: x.sharding, b)),
               out_shardings=(shardings, sharding.replicated(s.mesh)), donate_argnums=(0,))

  def init(seed: int):
    return jax.jit(lambda r: unbox(stage.init_state(r)), out_shardings=shardings)(jax.random.key(seed))
  return StageStep(name, cfg, stage, fn, state, b, init)


def materialise(specs, seed: int):
  """Random arrays for abstract batch specs (normal latents or embeddings, token ids)."""
  leaves, treedef = jax.tree.flatten(specs)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  arrays = []
  for k, x in zip(keys, leaves):
    if jnp.issubdtype(x.dtype, jnp.integer):
      a = jax.random.randint(k, x.shape, 1, 100, x.dtype)
    else:
      a = jax.random.normal(k, x.shape, x.dtype)
    arrays.append(jax.device_put(a, x.sharding))
  return treedef.unflatten(arrays)


def step_flops(s: Setup, name: str, batch: int, frames: int) -> float:
  mc, c = s.model_config, s.config
  if name == "stage1":
    return flops.stage1_train_flops(mc, batch=batch, frames=frames, tokens=s.tokens, text_len=c.text_len)
  if name == "long_video":  # about: each segment's D context frames are not counted
    return flops.stage3_step_flops(mc, batch=batch // 2, steps=frames, tokens=s.tokens, text_len=c.text_len)
  return flops.stage3_step_flops(mc, batch=batch, steps=frames, tokens=s.tokens, text_len=c.text_len)


def training_figures(s: Setup, peak: float, inspect=None) -> dict:
  """Compile, then time each stage's step on a random state and a fixed random batch; `inspect`
  (`programs.Inspect`) profiles each step and dumps its cost analysis."""
  c = s.config
  tb = c.train.batch
  frames = {"stage1": c.train.clip_frames, "stage3": c.train.rollout_steps}
  ndev = s.mesh.devices.size
  out = {"train_batch": tb, "stage1_clip_frames": frames["stage1"], "stage3_rollout_steps": frames["stage3"],
         "stage3_remat": c.train.remat}
  with s.use_mesh():
    for name in STAGES:
      st = stage_step(s, name, tb, frames[name])
      compiled = st.fn.lower(*st.args).compile()
      out[f"{name}_peak_bytes_per_device"] = memory_bytes(compiled)
      if inspect is not None and inspect.dump_dir:
        out[f"{name}_xla_flops"] = inspect.dump(f"{name}_train_step", compiled).get("flops")
      batch = materialise(st.batch, c.seed + 10)
      frozen = st.stage.frozen
      ms, state = time_carry_ms(lambda state: compiled(state, frozen, batch)[0], st.init(c.seed),
                                reps=c.train.reps, warmup=1)
      if inspect is not None:
        state = inspect.profile(f"{name}_train_step", lambda state: compiled(state, frozen, batch)[0], state,
                                warmup=0)
      del state
      fl = step_flops(s, name, tb, frames[name])
      out[f"{name}_step_ms"] = ms
      out[f"{name}_flops"] = fl
      out[f"{name}_tokens_per_s_per_device"] = tb * frames[name] * s.tokens / (ms / 1e3) / ndev
      out[f"{name}_mfu"] = fl / (ms / 1e3) / peak
      out[f"{name}_step"] = DESCRIPTION[name]
  return out
