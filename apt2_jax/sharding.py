"""Device mesh and the logical-axis rules that map model axes onto it.

Mesh axes (every config names all four; `-1` fills what the others leave):
  data      pure data parallelism (replicated parameters)
  fsdp      data parallelism with parameters and optimiser state sharded (ZeRO-3 style)
  tensor    tensor (head / MLP) parallelism
  sequence  context parallelism: tokens of a sample spread over devices (the paper's Ulysses)

Parameters and activations carry logical axis names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); `LOGICAL_RULES` below is the one table that maps them to mesh axes.
Configs copy it into `config.logical_rules` and may override entries there.

Sharding options of a model's training state (the paper's FSDP recipe; stage 3's
`config.adversarial.g_sharding` / `d_sharding`, `ZERO`):
  zero3  parameters, gradients and optimiser state sharded over the data-parallel devices (fsdp,
         and with `ZERO_OVER_SEQUENCE` in the rules the context-parallel ones too); every use of a
         weight gathers it: per layer per pass, and per step of a rollout.
  zero2  stored as zero3, but the model's weights are gathered whole over the data-parallel axes
         once per train step (`gather_whole`: its block matrices in the compute dtype) and every
         pass and rollout step reuses them; gradients reduce-scatter onto the shards, optimiser
         state stays sharded (FSDP's SHARD_GRAD_OP). The paper: ZeRO-2 for G during student
         forcing (no re-gather per recurrent forward), ZeRO-3 for D.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

LOGICAL_RULES = (
    # --- parameters -------------------------------------------------------------------------
    ("layers", None),            # stacked blocks (nn.scan): never split
    ("embed", "fsdp"),           # model width of weight matrices: ZeRO-3 over fsdp
    ("embed_out", None),         # a second width axis of square matrices
    ("heads", "tensor"),         # attention projections, per head
    ("mlp", "tensor"),           # FFN hidden
    ("mod", "tensor"),           # 6 x dim modulation projection
    ("in_channels", None), ("out_channels", None), ("freq", None), ("text_embed", None),
    ("vocab", None), ("caption", None), ("head_query", None),
    # --- activations ------------------------------------------------------------------------
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),   # tokens of a frame: context parallelism
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # --- KV cache ---------------------------------------------------------------------------
    ("cache_batch", ("data", "fsdp")),
    ("cache_frames", None),
    ("cache_length", "sequence"),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)


# Parameters and optimiser state sharded over the context-parallel devices too (FSDP over every
# device of the data and context parallelism, as the paper's): a rule override for
# `config.logical_rules` (`override_rules`). Without it each `sequence` group holds a whole copy.
ZERO_OVER_SEQUENCE = {"embed": ("fsdp", "sequence")}


ZERO = ("zero2", "zero3")
_DATA_AXES = ("data", "fsdp", "sequence")


def override_rules(rules, overrides: dict) -> tuple:
  """`rules` with the entries named in `overrides` ({logical name: mesh axes}) replaced."""
  return tuple((k, overrides.get(k, v)) for k, v in (tuple(r) for r in rules))


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves a `{data, fsdp, tensor, sequence}` config (one entry may be -1) to a shape."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def config_devices(config) -> list:
  """The devices a run uses: the first `config.num_devices` (0 or absent = all of them).

  Multi-host runs use all devices (every process must take part in the mesh).
  """
  n = int(config.get("num_devices", 0) or 0) if hasattr(config, "get") else 0
  devices = jax.devices()
  if n < 0 or n > len(devices):
    raise ValueError(f"config.num_devices={n} but {len(devices)} devices exist (0 = all)")
  if n and jax.process_count() > 1 and n != len(devices):
    raise ValueError(f"config.num_devices={n}: a {jax.process_count()}-process run must use all "
                     f"{len(devices)} devices (set 0)")
  return devices[:n] if n else devices


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with the four named axes, all of `AxisType.Auto`."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(config) -> tuple:
  """`config.logical_rules` (default `LOGICAL_RULES`), checked by `check_rules`."""
  rules = config.get("logical_rules", None) if hasattr(config, "get") else None
  return check_rules(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in (rules or LOGICAL_RULES)))


def check_rules(rules) -> tuple:
  """`rules` as a tuple; ValueError naming `config.logical_rules` when an entry is not a known
  logical axis name mapped to None, a mesh axis or a tuple of mesh axes (a misspelt name would
  otherwise be ignored silently, and an unknown mesh axis fail deep inside the first compile)."""
  rules = tuple(tuple(r) for r in rules)
  known = {name for name, _ in LOGICAL_RULES}
  bad_entries = [r for r in rules if len(r) != 2 or not isinstance(r[0], str)]
  if bad_entries:
    raise ValueError(f"config.logical_rules: entries must be (logical name, mesh axes) pairs, got {bad_entries}")
  unknown = sorted({name for name, _ in rules} - known)
  if unknown:
    raise ValueError(f"config.logical_rules: unknown logical axis name(s) {unknown}; known: {sorted(known)}")
  for name, axes in rules:
    for axis in (axes,) if axes is None or isinstance(axes, str) else axes:
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"config.logical_rules: {name!r} maps to {axis!r}, not a mesh axis {MESH_AXES} or None")
  return rules


def logical_to_sharding(logical_tree, mesh, rules=LOGICAL_RULES):
  """Maps a pytree of logical PartitionSpecs (or tuples of names) to NamedShardings."""
  def one(spec):
    spec = P(*spec) if isinstance(spec, tuple) else spec
    return NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules))
  return jax.tree.map(one, logical_tree, is_leaf=lambda x: isinstance(x, (P, tuple)))


def param_shardings(boxed_params, mesh, rules=LOGICAL_RULES):
  """NamedShardings for parameters initialised with `nn.with_logical_partitioning`.

  `boxed_params` may be the abstract result of `jax.eval_shape(init)` (boxed leaves). Arrays whose
  sharded dimension does not divide the mesh axis fall back to replication on that dimension.
  """
  specs = nn.get_partition_spec(boxed_params)
  from apt2_jax.models.dit import unbox
  shapes = unbox(boxed_params)

  def one(spec, shape):
    mesh_spec = nn.logical_to_mesh_axes(spec, rules)
    return NamedSharding(mesh, _fit(mesh_spec, shape.shape, mesh))
  return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def _fit(spec: P, shape, mesh) -> P:
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if size > 1 and dim % size == 0 else None)
  return P(*out)


def gather_whole(params, logical_specs, compute_dtype, after=None):
  """ZeRO-2's per-step copy of a model's parameters: each leaf constrained to its sharding with
  the data-parallel axes (data, fsdp, sequence) dropped (tensor parallelism stays), the kernels of
  the stacked blocks cast to `compute_dtype` first (what their `nn.Dense` does on every use, so
  the numerics are those of zero3; the gathered copy is half the float32 one). Under no mesh,
  `params` as they are.

  Args:
    params: a parameter tree (unboxed) sharded by `param_shardings`.
    logical_specs: its logical PartitionSpecs (`nn.get_partition_spec` of the boxed tree).
    after: optional array; the copy is made to depend on it (`stages.adversarial.after`), so that
      two gathers of the same parameters in one step stay two (XLA would merge them and keep the
      copy alive between the passes).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return params
  rules = nn.get_logical_axis_rules() or LOGICAL_RULES
  drop = lambda axes: (None if axes in _DATA_AXES else axes) if axes is None or isinstance(axes, str) else \
      (tuple(a for a in axes if a not in _DATA_AXES) or None)

  def one(path, x, spec):
    names = [getattr(k, "key", None) for k in path]
    if names[-1] == "kernel" and "blocks" in names:
      x = x.astype(compute_dtype)
    if after is not None:
      x = x + jnp.zeros((), x.dtype) * after.reshape(-1)[0].astype(x.dtype)
    mesh_spec = nn.logical_to_mesh_axes(spec, rules)
    return jax.lax.with_sharding_constraint(x, _fit(P(*(drop(a) for a in mesh_spec)), x.shape, mesh))
  return jax.tree_util.tree_map_with_path(one, params, logical_specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, ndim: int = 1, sequence_dim: int | None = None) -> NamedSharding:
  """Sharding of a batch array: leading dim over (data, fsdp); optionally one dim over sequence."""
  spec = [None] * ndim
  spec[0] = ("data", "fsdp")
  if sequence_dim is not None:
    spec[sequence_dim] = "sequence"
  return NamedSharding(mesh, P(*spec))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def cache_shardings(cache_shapes, mesh, rules=LOGICAL_RULES):
  """NamedShardings for a KV cache (see `kv_cache.CACHE_LOGICAL_AXES`)."""
  from apt2_jax.models import kv_cache
  out = {}
  for name, shape in cache_shapes.items():
    spec = nn.logical_to_mesh_axes(P(*kv_cache.CACHE_LOGICAL_AXES[name]), rules)
    out[name] = NamedSharding(mesh, _fit(spec, shape.shape, mesh))
  return out


def text_kv_shardings(text_kv_shapes, mesh, rules=LOGICAL_RULES):
  from apt2_jax.models import kv_cache
  return {name: NamedSharding(mesh, _fit(nn.logical_to_mesh_axes(P(*kv_cache.TEXT_KV_LOGICAL_AXES[name]), rules),
                                         shape.shape, mesh))
          for name, shape in text_kv_shapes.items()}


class use_mesh:
  """Context: `jax.set_mesh(mesh)` plus the logical rules for `nn.with_logical_constraint`."""

  def __init__(self, mesh, rules=LOGICAL_RULES):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._mesh_ctx = jax.set_mesh(self.mesh)
    self._mesh_ctx.__enter__()
    self._rules_ctx = nn.logical_axis_rules(self.rules)
    self._rules_ctx.__enter__()
    return self.mesh

  def __exit__(self, *exc):
    self._rules_ctx.__exit__(*exc)
    return self._mesh_ctx.__exit__(*exc)
