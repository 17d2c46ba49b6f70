"""Inference: the streaming generator, the sampling CLI and the interactive server.

`StreamingGenerator` and `stream_noise` are imported lazily, so that `apt2_jax.inference.controls`
(numpy only) can be used without loading the model code (e.g. by `apt2_jax.export`'s loader).
"""
from apt2_jax.inference.controls import ControlError, control_type

__all__ = ["ControlError", "StreamingGenerator", "control_type", "stream_noise"]


def __getattr__(name):
  if name in ("StreamingGenerator", "stream_noise"):
    from apt2_jax.inference import streaming
    return getattr(streaming, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
