"""The diffusion-family stages (0 pretrain, 1 adapt, 2 distill) and the base config they share.

`base_config(stage, size, world)` is the config of every DiT stage (stage 3 starts from it too);
`pretrain_config`, `adapt_config` and `distill_config` set what differs per stage. Their argument
is `size` or `size,world=puppet` (`parse_arg`). Field reference (validated at start by
`apt2_jax.train.validate_config` and the stage constructors):

  stage, seed                 stage name (train.ALL_STAGES); the run's seed (init, data, steps)
  model                       `DiTConfig` fields (`apt2_jax/configs/sizes.py` sizes)
  mesh, logical_rules         {data, fsdp, tensor, sequence} (one may be -1); sharding table
  num_devices                 the mesh spans the first N devices (0 = all; tests and debugging)
  batch_size, microbatches    global batch; gradient accumulation over that many microbatches
  num_steps                   total optimiser steps (the schedule's length)
  optimizer                   name, learning_rate, schedule, warmup_steps, end_factor, b1, b2, eps,
                              weight_decay, grad_clip
  ema_decay                   0 = no EMA; else `ema_params` is kept (and evaluated)
  init_from, init_from_key    workdir of an earlier stage and its entry ("ema_params" / "params")
  caption_dropout             probability of training a clip on empty text (for CFG sampling)
  recycle                     False: the no-recycling ablation, trained so from stage 1 on (every
                              block after the first sees a zero recycled input, as its rollout does)
  flow.shift                  s of the time shift s t / (1 + (s - 1) t): `sizes.flow_shift` of the
                              tokens per latent frame (24 at the paper's 736x416 = 1196 tokens,
                              `wan_1_3b`/`apt2_8b`; 1.39 at `tiny`'s 32x32, 2.78 at `small`'s 64x64),
                              set with the eval and distillation shifts by `apply_shift`
  flow.weight_t               loss weighting: the velocity MSE of a clip at flow time t is weighted
                              min(1, (t / weight_t)^2) (`flow.loss_weight`). 0: the paper's plain
                              velocity MSE (its clean-latent error weighs 1 / t^2); 1: the
                              clean-latent (x0) MSE, every t alike (for x0-predicting heads)
  data                        source ("pipeline" | "worlds" | "random_latents" | "tfds"), tfds_name,
                              data_dir, latents (source "tfds", `apt2_jax/train/data.py`), world, frames (1 + 4k video
                              frames), height, width (video pixels), control_dim, control_encoding
                              (the world's unit-scale default: camera "rays" = 24 model channels,
                              pose "keypoint_maps" = 60; "raw" stays loadable), text_len,
                              pool_size (clips rendered by the "worlds" source), pre_encode
                              ("worlds" only: encode the pool with the frozen VAE once at start
                              and train on its latents, instead of encoding every batch)
  vae                         size and checkpoint (a `vae` stage workdir; "" = random VAE, smoke only)
  log_every, eval_every       metric and evaluation periods (steps); eval_at_end
  checkpoint_every, keep_checkpoints, async_checkpointing
  max_nonfinite_in_a_row      abort after this many skipped (non-finite) steps in a row
  eval                        seed, batch_size, loss_times, sample_steps / sample_shift / guidance /
                              sample_cache_from (stage-1 baseline: multi-step Euler sampler with CFG;
                              "matched": one KV cache per schedule time, as stage 1 trains, see
                              `apt2_jax.rollout`; 2 x sample_steps passes and caches per frame)
"""
import ml_collections

from apt2_jax.configs import sizes

CONTROL_DIM = {"camera": 5, "puppet": 30, "bouncing": 0, "panorama": 5, "torus": 5}  # apt2_jax.data.worlds *World.control_dim

# size: (batch, video frames, height, width, steps, toy learning rate)
_SIZE_SETTINGS = {
    "tiny": (8, 9, 32, 32, 20, 1e-3),
    "small": (8, 17, 64, 64, 20_000, 3e-4),
    "wan_1_3b": (64, 81, 416, 736, 20_000, 1e-5),
    "apt2_8b": (256, 81, 416, 736, 20_000, 1e-5),
}


def base_config(stage: str, size: str, world: str = "camera") -> ml_collections.ConfigDict:
  if size not in _SIZE_SETTINGS:
    raise ValueError(f"unknown size {size!r}; choose one of {tuple(_SIZE_SETTINGS)}")
  if world not in CONTROL_DIM:
    raise ValueError(f"unknown world {world!r}; choose one of {tuple(CONTROL_DIM)}")
  batch, frames, height, width, steps, lr = _SIZE_SETTINGS[size]
  toy = size in ("tiny", "small")
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  encoding, channels = control_encoding(world)
  c.model = sizes.model_config(size, control_channels=channels)
  c.mesh = sizes.mesh_config(data=-1, fsdp=1) if toy else sizes.mesh_config(data=1, fsdp=-1)
  # The paper sizes shard parameters and optimiser state over context parallelism too
  # (`--config.mesh.sequence=8`: FSDP over all 8 devices, not a whole copy per sequence group).
  c.logical_rules = sizes.logical_rules(over_sequence=size in ("wan_1_3b", "apt2_8b"))
  c.num_devices = 0  # 0 = all devices

  c.batch_size = batch
  c.microbatches = 1
  c.num_steps = steps
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=lr, schedule="constant", warmup_steps=0 if size == "tiny" else 100,
      end_factor=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0))
  c.ema_decay = 0.0 if size == "tiny" else 0.999
  c.init_from = ""
  c.init_from_key = "ema_params"
  c.caption_dropout = 0.1
  c.recycle = True
  c.flow = ml_collections.ConfigDict(dict(shift=1.0, weight_t=0.0))  # apply_shift below

  c.data = ml_collections.ConfigDict(dict(
      source="pipeline", world=world, frames=frames, height=height, width=width,
      control_dim=CONTROL_DIM[world], control_encoding=encoding, text_len=16, pool_size=64, pre_encode=False,
      # source "tfds": a built dataset (e.g. apt2_local_videos/<name>); latents "auto" | "stored" | "encode"
      tfds_name="", data_dir="", latents="auto"))
  c.vae = ml_collections.ConfigDict(dict(size="tiny" if size == "tiny" else "small" if toy else "wan",
                                         checkpoint=""))

  c.log_every = 1 if size == "tiny" else 20
  c.eval_every = 0 if size == "tiny" else 1000
  c.eval_at_end = True
  c.checkpoint_every = 10 if size == "tiny" else 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.progress_bar = True
  c.max_nonfinite_in_a_row = 10
  c.eval = ml_collections.ConfigDict(dict(
      seed=1234, batch_size=batch, loss_times=(0.25, 0.5, 0.75, 0.95),
      sample_steps=4 if size == "tiny" else 32, sample_shift=1.0, sample_cache_from="matched",
      guidance=1.0 if size == "tiny" else 3.0))
  return apply_shift(c)


def control_encoding(world: str) -> tuple[str, int]:
  """(encoding, model control channels) of `world`'s controls at unit scale: camera "rays" (24),
  pose "keypoint_maps" (60), none ("", 0) (`apt2_jax.controls.default_encoding`)."""
  from apt2_jax import controls  # imports JAX: only when a config is built
  encoding = controls.default_encoding(controls.WORLD_CONTROL_TYPES[world])
  return encoding, controls.control_channels(encoding, CONTROL_DIM[world])


def apply_shift(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets every time shift of a DiT stage config from its tokens per latent frame
  (`sizes.flow_shift`): `flow.shift`, `eval.sample_shift` and (stage 2) `distill.shift`. Call it
  again after changing `data.height`/`data.width` or `model.patch_size`."""
  shift = sizes.flow_shift(sizes.tokens_per_frame(c.data.height, c.data.width, c.model.patch_size))
  c.flow.shift = shift
  c.eval.sample_shift = shift
  if "distill" in c:
    c.distill.shift = shift
  return c


def parse_arg(arg: str):
  """`size` or `size,world=puppet` -> (size, {key: value})."""
  parts = (arg or "small").split(",")
  extra = dict(p.split("=", 1) for p in parts[1:])
  return parts[0], extra


def pretrain_config(arg: str = "small") -> ml_collections.ConfigDict:
  """Stage 0: bidirectional video diffusion from scratch, plain input `[noise | control]`."""
  size, extra = parse_arg(arg)
  c = base_config("pretrain", size, extra.get("world", "camera"))
  c.model.recycled_channels = False
  c.eval.sample_steps = 0  # streamed sampling needs the block-causal model (stage 1)
  return c


def adapt_config(arg: str = "small") -> ml_collections.ConfigDict:
  """Stage 1: diffusion adaptation with teacher forcing (paper values at the paper's sizes)."""
  size, extra = parse_arg(arg)
  c = base_config("adapt", size, extra.get("world", "camera"))
  if size in ("wan_1_3b", "apt2_8b"):
    c.optimizer.learning_rate = 1e-5
    c.optimizer.weight_decay = 0.01
  return c


def distill_config(arg: str = "small") -> ml_collections.ConfigDict:
  """Stage 2: consistency distillation to one step: 32-step schedule (shift 24 at the paper's
  tokens per frame, `sizes.flow_shift`), no CFG."""
  size, extra = parse_arg(arg)
  c = base_config("distill", size, extra.get("world", "camera"))
  c.caption_dropout = 0.0  # no CFG in distillation
  c.optimizer.learning_rate = {"tiny": 1e-3, "small": 1e-4}.get(size, 1e-5)
  c.distill = ml_collections.ConfigDict(dict(num_steps=32, shift=1.0, teacher="", teacher_key="ema_params"))
  c.eval.sample_steps = 1
  return apply_shift(c)
