"""The one way from weights to frames.

  loading.py  `load(workdir_or_bundle) -> Generator` (configs, generator params, the VAE),
              `random_generator(...)`
  vae.py      `load_vae(workdir_or_diffusers_folder)`, the VAE-config codec
  prompt.py   host-side prompt preparation (caption, tokens or embeddings)
  stream.py   the pure, jittable stream functions (start, text, step, chunk, decode; guidance;
              one noise convention; one cache-index rebase) and their jitted, shared versions
  bundle.py   the export bundle's file format

`apt2_jax.inference.StreamingGenerator`, `apt2_jax.export`, the evaluation, the benchmark, the
stream demo and the stages' in-training samples all go through these modules.
"""
__all__ = ["Generator", "StreamSpec", "load", "random_dit_params", "random_generator"]


def __getattr__(name):  # lazy: `generation.bundle` alone must not import the model code
  if name in ("Generator", "load", "random_dit_params", "random_generator"):
    from apt2_jax.generation import loading
    return getattr(loading, name)
  if name == "StreamSpec":
    from apt2_jax.generation.stream import StreamSpec
    return StreamSpec
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
