"""Stage 2 "distill": consistency distillation of the stage-1 model to a 1-NFE generator.

Teacher forced like stage 1 (clean recycled frames, block-causal mask). Per clip one index n of
the `config.distill.num_steps`-step schedule shifted with `config.distill.shift` (32, 24):
  x_n     = (1 - t_n) x_{s+1} + t_n eps
  x_{n+1} = x_n + (t_{n+1} - t_n) v_teacher(x_n, t_n)          frozen stage-1 model, no CFG
  loss    = || f(x_n, t_n) - sg(f(x_{n+1}, t_{n+1})) ||^2,  f(x, t) = x - t v_student(x, t)
The student starts from the teacher (`config.init_from`, required); the target is the online
student under stop_gradient (no EMA target, as in the paper). The result generates a frame as
`x = eps - v(eps, t=1)`; eval streams it through `apt2_jax.rollout` (num_steps = 1).

State: {params, opt_state, [ema_params], counters}; the teacher is `frozen['teacher']` (not saved).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from apt2_jax import checkpointing, train
from apt2_jax.objectives import consistency, flow
from apt2_jax.rollout import RolloutOptions
from apt2_jax.stages import common
from apt2_jax.stages.diffusion import DiffusionStage


class DistillStage(DiffusionStage):

  def __init__(self, config, mesh):
    if not config.get("init_from", ""):
      raise ValueError("config.init_from must name the stage-1 (adapt) workdir: the student starts "
                       "from it and it is the teacher")
    if not config.model.recycled_channels:
      raise ValueError("config.model.recycled_channels must be True for stage 'distill'")
    super().__init__(config, mesh)
    self.mode = "block_causal"
    self._teacher = None

  @property
  def frozen(self):
    if self._teacher is None:  # the teacher, laid out like the student's parameters
      from apt2_jax.sharding import param_shardings, rules_from_config
      from apt2_jax.models import init_params
      boxed = jax.eval_shape(lambda: init_params(self.model, jax.random.key(0), boxed=True))
      shardings = param_shardings(boxed, self.mesh, rules_from_config(self.config))
      teacher_from = self.config.distill.get("teacher", "") or self.config.init_from
      self._teacher, _ = checkpointing.load_params(
          teacher_from, key=self.config.distill.get("teacher_key", "ema_params"), shardings=shardings)
    return dict(self.inputs.frozen, teacher=self._teacher)

  @frozen.setter
  def frozen(self, value):  # the base class assigns the VAE-only dict; the property adds the teacher
    pass

  # ---------------------------------------------------------------------------------------------
  def draw(self, frozen, batch, rng):
    latents, controls, text = self.inputs(frozen, batch)
    rng_n, rng_eps = jax.random.split(rng)
    recycled, x0, controls = flow.teacher_forcing_inputs(latents, controls, bool(self.config.get("recycle", True)))
    d = self.config.distill
    t, t_next = consistency.sample_interval(rng_n, x0.shape[0], d.num_steps, d.shift)
    eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
    xt = flow.noisy(x0, eps, t)
    v_teacher = self.model.apply({"params": frozen["teacher"]}, xt, recycled, controls, t, text,
                                 mode="block_causal")
    out = {"xt": xt, "t": t, "t_next": t_next, "text": text, "recycled": recycled,
           "xt_next": consistency.teacher_euler_step(xt, t, t_next, jax.lax.stop_gradient(v_teacher))}
    if controls is not None:
      out["control"] = controls
    return out

  def loss_fn(self, params, mb):
    apply = lambda x, t: self.model.apply({"params": params}, x, mb["recycled"], mb.get("control"), t,
                                          mb["text"], mode="block_causal")
    f = consistency.consistency_fn(mb["xt"], mb["t"], apply(mb["xt"], mb["t"]))
    target = jax.lax.stop_gradient(
        consistency.consistency_fn(mb["xt_next"], mb["t_next"], apply(mb["xt_next"], mb["t_next"])))
    return jnp.mean(flow.mse(f, target, self.inputs.loss_weights)), {}

  # ---------------------------------------------------------------------------------------------
  def _eval_fn(self, params, frozen, batch):
    mb = self.draw(frozen, batch, jax.random.key(self.config.eval.seed))
    out = {"loss": self.loss_fn(params, mb)[0]}
    one = self.sample_metrics(params, frozen, batch, 1, 1.0, 1.0)
    out.update({f"one_step_{k}": v for k, v in one.items()})
    return out


def make_stage(config, mesh):
  return DistillStage(config, mesh)
