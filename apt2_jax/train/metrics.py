"""Metrics of a run: the console, TensorBoard and `{workdir}/metrics.jsonl` (process 0 only).

`MetricWriter.write(step, metrics, prefix)` logs one absl line (the loop calls it every
`config.log_every` steps and after each evaluation; train lines carry steps/s and an ETA measured
from the steps after the first, compiled one), writes TensorBoard scalars `{prefix}/{name}` and
appends one JSON line. On the first start of a run the config goes to TensorBoard as text and as
hyper-parameters (the HPARAMS tab); `write_videos` puts evaluation rollouts in the IMAGES tab,
each as an animated GIF and as a strip of frames.
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import time

import numpy as np
from absl import logging

# Metrics shown first on a console line, in this order; the rest follow alphabetically.
_FIRST = ("loss", "g_loss", "d_loss", "grad_norm", "learning_rate")
# Train metrics left off the console line (in TensorBoard and metrics.jsonl all the same).
_QUIET = ("nonfinite_in_a_row", "nonfinite_total", "steps_per_second")
# Scalars for the HPARAMS tab's metric columns.
_HPARAM_METRICS = ("train/loss", "eval/loss", "eval/rollout_mse")


def _format_value(v: float) -> str:
  if v == 0 or not math.isfinite(v):
    return f"{v:g}"
  return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


def format_metrics(metrics: dict, limit: int = 8) -> str:
  """`loss=0.1234 grad_norm=1.2 ...`: the first `limit` metrics (the important ones first)."""
  names = [k for k in _FIRST if k in metrics]
  names += sorted(k for k in metrics if k not in names and k not in _QUIET)
  shown = names[:limit]
  text = " ".join(f"{k}={_format_value(float(metrics[k]))}" for k in shown)
  if len(names) > limit:
    text += f" (+{len(names) - limit} more)"
  return text


def flat_config(config) -> dict:
  """A ConfigDict (or dict) as `{"a.b": scalar}`, lists and None as strings (TensorBoard hparams)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(node, (bool, int, float, str)):
      out[prefix] = node
    else:
      out[prefix] = json.dumps(node, default=str)
  walk("", config)
  return out


def image_strip(video: np.ndarray, max_frames: int = 8) -> np.ndarray:
  """uint8 `[T, H, W, 3]` or `[B, T, H, W, 3]` -> one `[B*H, k*W, 3]` image of k <= `max_frames`
  evenly spaced frames per sample (samples one under another)."""
  video = np.asarray(video, np.uint8)
  if video.ndim == 4:
    video = video[None]
  t = video.shape[1]
  idx = np.unique(np.linspace(0, t - 1, min(max_frames, t)).round().astype(int))
  picked = video[:, idx]  # [B, k, H, W, 3]
  b, k, h, w, c = picked.shape
  return picked.transpose(0, 2, 1, 3, 4).reshape(b * h, k * w, c)


def gif_bytes(video: np.ndarray, fps: float = 8.0) -> bytes:
  """uint8 `[T, H, W, 3]` -> an animated GIF (TensorBoard plays it in the IMAGES tab)."""
  from PIL import Image
  frames = [Image.fromarray(f) for f in np.asarray(video, np.uint8)]
  buf = io.BytesIO()
  frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                 duration=max(int(round(1000.0 / fps)), 20))
  return buf.getvalue()


def _tile_samples(video: np.ndarray) -> np.ndarray:
  """`[B, T, H, W, 3]` -> `[T, B*H, W, 3]` (samples one under another)."""
  video = np.asarray(video, np.uint8)
  if video.ndim == 4:
    return video
  b, t, h, w, c = video.shape
  return video.transpose(1, 0, 2, 3, 4).reshape(t, b * h, w, c)


class MetricWriter:
  """Logs, and writes `{prefix}/{name}` scalars per step to TensorBoard and one JSON line per call.

  Args:
    workdir: the run's directory (`tensorboard/`, `metrics.jsonl`).
    enabled: only the primary process logs and writes.
    config: the run's config, written to TensorBoard when the run's event files are new.
    total_steps: `config.num_steps`, for the ETA of train lines.
  """

  def __init__(self, workdir: str, enabled: bool = True, config=None, total_steps: int | None = None):
    self.enabled, self.total_steps = enabled, total_steps
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # heavy; only the primary process writes
    os.makedirs(workdir, exist_ok=True)
    tb_dir = os.path.join(workdir, "tensorboard")
    fresh = not glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
    # The suffix keeps a writer opened within the same second as the last one (a quick resume) from
    # reusing, and truncating, its event file (named by the second and the host).
    self.tb = SummaryWriter(tb_dir, filename_suffix=f".{time.time_ns()}")
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if config is not None and fresh:
      self.write_config(config)

  # ----------------------------------------------------------------------------------------------
  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.enabled or not metrics:
      return
    self._log(step, metrics, prefix)
    flat = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    for k, v in flat.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": int(step), **flat}) + "\n")
    self.jsonl.flush()

  def _log(self, step: int, metrics: dict, prefix: str):
    head = f"step {int(step)}"
    if self.total_steps:
      head += f"/{int(self.total_steps)}"
    rate = metrics.get("steps_per_second")
    tail = ""
    if rate:
      tail = f" | {float(rate):.3g} steps/s"
      if self.total_steps and self.total_steps > step:
        from apt2_jax.runtime import format_duration
        tail += f", ETA {format_duration((self.total_steps - step) / float(rate))}"
    limit = 8 if prefix == "train" else 12
    logging.info("%s %s: %s%s", prefix, head, format_metrics(metrics, limit), tail)

  # ----------------------------------------------------------------------------------------------
  def write_config(self, config):
    """The config as TensorBoard text (TEXT tab) and hyper-parameters (HPARAMS tab)."""
    if not self.enabled:
      return
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(as_dict, indent=2, sort_keys=True, default=str)
    # Markdown: indent by four spaces to render as a code block.
    self.tb.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
    try:
      from tensorboardX.summary import hparams
      exp, ssi, sei = hparams(flat_config(as_dict), {k: 0.0 for k in _HPARAM_METRICS})
      writer = self.tb._get_file_writer()  # pylint: disable=protected-access
      for summary in (exp, ssi, sei):
        writer.add_summary(summary)
    except Exception as e:  # pragma: no cover - never fail a run over its hparams table
      logging.warning("could not write the config as TensorBoard hparams: %s", e)
    self.tb.flush()

  def write_videos(self, step: int, videos: dict, prefix: str = "eval", fps: float = 8.0):
    """uint8 videos `[T, H, W, 3]` or `[B, T, H, W, 3]` as `{prefix}/{name}` (animated GIF) and
    `{prefix}/{name}_strip` (evenly spaced frames) images."""
    if not self.enabled or not videos:
      return
    from tensorboardX.proto.summary_pb2 import Summary
    writer = self.tb._get_file_writer()  # pylint: disable=protected-access
    for name, video in videos.items():
      video = np.asarray(video, np.uint8)
      tiled = _tile_samples(video)
      t, h, w, _ = tiled.shape
      gif = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif_bytes(tiled, fps))
      writer.add_summary(Summary(value=[Summary.Value(tag=f"{prefix}/{name}", image=gif)]), step)
      self.tb.add_image(f"{prefix}/{name}_strip", image_strip(video), step, dataformats="HWC")
    self.tb.flush()
    logging.info("%s step %d: wrote %d rollout video(s) to TensorBoard (%s)", prefix, int(step), len(videos),
                 ", ".join(sorted(videos)))

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


def last_metrics(workdir: str) -> dict:
  """`{"train": {...}, "eval": {...}}`: the last logged row of each prefix in `metrics.jsonl`
  (what a finished run reports when it is started again)."""
  out = {"train": {}, "eval": {}}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      for prefix in out:
        values = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith(prefix + "/")}
        if values:
          out[prefix] = values
  return out
