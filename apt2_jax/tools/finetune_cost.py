r"""Memory per device of fine-tuning Wan2.1 1.3B, from the compile-only (AOT) analysis.

    python -m apt2_jax.tools.finetune_cost --json_out=/tmp/wan_cost.json [--cases=wan_stage1_1dev,...]

The `wan_1_3b` group of `apt2_jax.benchmark.aot.AOT_CASES`, through the same code path as
`python -m apt2_jax.benchmark --aot` (`aot.measure`: `AOT_XLA_FLAGS` always set, per-device
argument, output, temporary and peak bytes printed as each case compiles): the stages' own guarded
train steps and the streaming step at Wan2.1's own resolution (832x480, 81 video frames = 21
latent frames), on 1 and on 8 devices (context parallelism: each clip's tokens over the 8), with
the README fine-tune commands' settings (`aot.WAN_TRAIN_MODEL`). Every case is written to
`--json_out` as soon as it is compiled (long compiles: a partial run keeps what it measured).
"""
from __future__ import annotations

import os

from absl import app
from absl import flags

_CASES = flags.DEFINE_list("cases", ["wan_1_3b"], "AOT cases or groups (apt2_jax.benchmark.aot.AOT_CASES, AOT_GROUPS)")
_JSON_OUT = flags.DEFINE_string("json_out", "", "JSON file the rows go to (rewritten per case)")
_SIZE = flags.DEFINE_string("size", "", "model size for every case instead of its own (apt2_jax/configs/sizes.py)")


def main(argv):
  del argv
  from apt2_jax.benchmark import aot
  try:
    names = aot.case_names(_CASES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  aot.measure(names, json_out=_JSON_OUT.value or None, size=_SIZE.value or None)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)
