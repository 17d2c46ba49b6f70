"""Metrics of a run: TensorBoard event files and `{workdir}/metrics.jsonl` (process 0 only)."""
from __future__ import annotations

import json
import os


class MetricWriter:
  """Writes `{prefix}/{name}` scalars per step to TensorBoard and one JSON line per call."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # heavy; only the primary process writes
    os.makedirs(workdir, exist_ok=True)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.enabled:
      return
    flat = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    for k, v in flat.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": int(step), **flat}) + "\n")
    self.jsonl.flush()

  def close(self):
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


def read_metrics(workdir: str, prefix: str = "train/loss") -> dict[int, float]:
  """`{step: value}` of one metric from `metrics.jsonl` (later lines win, as after a resume)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if prefix in row:
        out[row["step"]] = row[prefix]
  return out
