r"""Memory per device of fine-tuning Wan2.1 1.3B, from the compile-only (AOT) analysis.

    python -m apt2_jax.tools.finetune_cost --json_out=/tmp/wan_cost.json [--cases=stage1_1dev,...]

The same analysis as `python -m apt2_jax.benchmark --aot` (`apt2_jax.benchmark.aot.aot_case`:
lower and compile the stages' own guarded train steps and the streaming step for virtual CPU
devices, bytes from XLA's `memory_analysis()`), at `wan_1_3b` instead of `apt2_8b`, at Wan2.1's
own resolution (832x480, 81 video frames = 21 latent frames), on 1 and on 8 devices (context parallelism: each clip's tokens over the 8). Every case
is written to `--json_out` as soon as it is compiled (long compiles: a partial run keeps what it
measured). CPU figures: the XLA attention path without flash attention, so GPU peaks are lower.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags

_ONE = dict(data=1, fsdp=1, tensor=1, sequence=1)
_CP8 = dict(data=1, fsdp=1, tensor=1, sequence=8)  # each sample's tokens over 8 devices (Ulysses)
# Wan2.1's resolution and clip (81 frames), window N = 21 latent frames (the whole clip).
_WAN = dict(height=480, width=832, window=21, batch=1)
# What the README's fine-tune commands set: bfloat16 compute (float32 master weights and optimiser
# state), every block rematerialised, the block-causal pass one query frame at a time.
TRAIN_MODEL = dict(dtype="bfloat16", remat_policy="full", query_chunk=1)
STREAM_MODEL = dict(dtype="bfloat16", param_dtype="bfloat16")
CASES = {
    "stream_1dev": dict(kind="stream", devices=1, mesh=_ONE, model=STREAM_MODEL, **_WAN),
    "stage1_1dev": dict(kind="stage1", devices=1, mesh=_ONE, frames=21, model=TRAIN_MODEL, **_WAN),
    "stage1_8dev": dict(kind="stage1", devices=8, mesh=_CP8, frames=21, model=TRAIN_MODEL, **_WAN),
    "stage3_1dev": dict(kind="stage3", devices=1, mesh=_ONE, frames=20, model=TRAIN_MODEL, **_WAN),
    "stage3_8dev": dict(kind="stage3", devices=8, mesh=_CP8, frames=20, model=TRAIN_MODEL, **_WAN),
    # The same with the configs' own sharding rules (what `--config.mesh.sequence=8` alone gives):
    # parameters and optimiser state replicated over the 8 context-parallel devices.
    "stage1_8dev_replicated": dict(kind="stage1", devices=8, mesh=_CP8, frames=21, model=TRAIN_MODEL,
                                   zero3=False, **_WAN),
    "stage3_8dev_replicated": dict(kind="stage3", devices=8, mesh=_CP8, frames=20, model=TRAIN_MODEL,
                                   zero3=False, **_WAN),
}

_CASES = flags.DEFINE_list("cases", list(CASES), f"cases to compile, of {list(CASES)}")
# Training cases shard parameters and optimiser state over fsdp and sequence (ZeRO-3 over the
# context-parallel devices, `aot._CP_RULES_OVERRIDE`) unless `zero3=False`.
_JSON_OUT = flags.DEFINE_string("json_out", "", "JSON file the rows go to (rewritten per case)")
_SIZE = flags.DEFINE_string("size", "wan_1_3b", "model size (apt2_jax/configs/sizes.py)")


def main(argv):
  del argv
  import jax
  jax.config.update("jax_num_cpu_devices", max(CASES[c]["devices"] for c in _CASES.value))
  from apt2_jax.benchmark import aot, report
  rows = []
  for name in _CASES.value:
    case = dict(CASES[name])
    model = case.pop("model", {})
    zero3 = case.pop("zero3", True)
    saved, aot._CP_RULES_OVERRIDE = aot._CP_RULES_OVERRIDE, (aot._CP_RULES_OVERRIDE if zero3 else {})  # pylint: disable=protected-access
    try:
      row = aot.aot_case(name, case, size=_SIZE.value, **model)
    finally:
      aot._CP_RULES_OVERRIDE = saved  # pylint: disable=protected-access
    row["model_overrides"], row["zero3_over_sequence"] = model, zero3
    rows.append(row)
    print(report.aot_table(rows[-1:]), flush=True)
    if _JSON_OUT.value:
      os.makedirs(os.path.dirname(os.path.abspath(_JSON_OUT.value)), exist_ok=True)
      with open(_JSON_OUT.value, "w") as f:
        json.dump(dict(size=_SIZE.value, aot=rows, jax_version=jax.__version__), f, indent=2)
  print(report.aot_table(rows))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)
