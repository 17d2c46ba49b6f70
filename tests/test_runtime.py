"""What every command sets up (apt2_jax/runtime.py) and what a run shows: the compilation-cache
setting, the console filter, compile notices, progress bars off a terminal, the metric lines with
rate and ETA, TensorBoard's config and rollout images, profiles, remote paths, MP4s without the
fork warning. All cheap: no model is compiled here."""
import glob
import logging as py_logging
import os
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from apt2_jax import media, runtime
from apt2_jax.train import metrics as metrics_lib


def test_cache_dir_setting(monkeypatch, tmp_path):
  monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert runtime.cache_dir_setting() == str(tmp_path / "apt2_jax" / "jax_compilation_cache")
  monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "env"))
  assert runtime.cache_dir_setting() == str(tmp_path / "env")
  assert runtime.cache_dir_setting(str(tmp_path / "flag")) == str(tmp_path / "flag")  # the flag wins
  for off in ("off", "0", "none", ""):
    assert runtime.cache_dir_setting(off) is None
  monkeypatch.setenv(runtime.CACHE_ENV, "off")
  assert runtime.cache_dir_setting() is None


def _record(path, msg, args=(), level=py_logging.INFO):
  return py_logging.LogRecord("absl", level, path, 1, msg, args, None)


def test_console_filter_keeps_one_line_per_save():
  f = runtime.ConsoleFilter()
  orbax = os.path.join("site-packages", "orbax", "checkpoint", "_src", "x.py")
  assert not f.filter(_record(orbax, "[process=0] Saving checkpoint at step %d", (3,)))
  assert not f.filter(_record(orbax, "Creating tmp directory /w/checkpoints/3.orbax-checkpoint-tmp"))
  done = _record(orbax, "[process=0] [async] Finished save (blocking + background) in 1.35 seconds @ /w/checkpoints/3")
  assert f.filter(done) and done.getMessage() == "saved checkpoint /w/checkpoints/3 (1.4 s)"
  assert f.filter(done)  # the logger's and the handler's filter both see it
  assert f.filter(_record(orbax, "disk full", level=py_logging.WARNING))  # warnings pass
  assert not f.filter(_record(orbax, "Metadata file does not exist: /w/checkpoints/3/state/_CHECKPOINT_METADATA",
                              level=py_logging.WARNING))  # but this expected one of load_params
  assert not f.filter(_record("xla_bridge.py", "Unable to initialize backend 'tpu': INTERNAL: ..."))
  assert f.filter(_record("loop.py", "resumed from /w at step 3"))


def test_compile_notice(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, "info", lambda msg, *args: lines.append(msg % args))
  monkeypatch.setattr(runtime, "NOTICE_AFTER_S", 0.0)
  runtime.install_compile_notices()
  before = runtime.compile_totals()["count"]
  jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.125)(jnp.arange(7.0)).block_until_ready()
  assert runtime.compile_totals()["count"] > before
  assert any(line.startswith("compiled jit(<lambda>) in ") for line in lines), lines


def test_progress_bar_only_on_a_terminal(capsys):
  assert runtime.progress_bar(True, total=3) is None  # pytest's stderr is no terminal
  assert runtime.progress_bar(False, total=3) is None
  assert runtime.format_duration(5) == "5 s" and runtime.format_duration(125) == "2:05"
  assert runtime.format_duration(3723) == "1:02:03"


def test_remote_paths_are_refused():
  assert runtime.check_local_path("/tmp/run", "workdir") == "/tmp/run"
  assert runtime.check_local_path(None, "workdir") is None
  with pytest.raises(ValueError, match="gs://.*not supported.*gcsfuse"):
    runtime.check_local_path("gs://bucket/run", "--workdir")


def _events(directory):
  """The Event protos of the TensorBoard files under `directory` (TFRecord framing)."""
  from tensorboardX.proto.event_pb2 import Event
  out = []
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      out.append(Event.FromString(data[i + 12:i + 12 + n]))
      i += 12 + n + 4
  return out


def test_metric_writer_logs_rate_and_eta_and_writes_config_and_videos(tmp_path, monkeypatch):
  lines = []
  monkeypatch.setattr(metrics_lib.logging, "info", lambda msg, *args: lines.append(msg % args))
  config = {"stage": "adapt", "num_steps": 100, "model": {"dim": 32, "window": [1, 2]}}
  w = metrics_lib.MetricWriter(str(tmp_path), config=config, total_steps=100)
  w.write(20, {"loss": 0.5, "grad_norm": 2.0, "steps_per_second": 4.0, "nonfinite_total": 0.0})
  w.write(20, {"loss": 0.25, "rollout_mse": 0.1}, prefix="eval")
  video = np.random.default_rng(0).integers(0, 255, (2, 5, 8, 16, 3), dtype=np.uint8)
  w.write_videos(20, {"rollout": video})
  w.close()
  assert lines[0] == "train step 20/100: loss=0.5 grad_norm=2 | 4 steps/s, ETA 20 s", lines
  assert lines[1].startswith("eval step 20/100: loss=0.25 rollout_mse=0.1")
  tags = {v.tag: v for e in _events(str(tmp_path / "tensorboard")) if e.HasField("summary") for v in e.summary.value}
  assert {"train/loss", "eval/rollout_mse", "eval/rollout", "eval/rollout_strip"} <= set(tags)
  assert tags["eval/rollout"].image.encoded_image_string[:6] == b"GIF89a"  # animated
  assert (tags["eval/rollout"].image.height, tags["eval/rollout"].image.width) == (16, 16)  # 2 samples stacked
  assert "config/text_summary" in tags and "_hparams_/experiment" in tags
  assert metrics_lib.last_metrics(str(tmp_path))["eval"] == {"loss": 0.25, "rollout_mse": 0.1}
  # The config goes in once: a resumed run's writer adds no second copy.
  metrics_lib.MetricWriter(str(tmp_path), config=config, total_steps=100).close()
  configs = [v for e in _events(str(tmp_path / "tensorboard")) if e.HasField("summary")
             for v in e.summary.value if v.tag == "config/text_summary"]
  assert len(configs) == 1
  assert metrics_lib.image_strip(video, max_frames=3).shape == (16, 48, 3)


def test_step_profiler_traces_steady_steps(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x) + 1.0)
  x = jnp.ones((16, 16))
  profiler = runtime.StepProfiler(str(tmp_path), steps=2, first_step=0, skip=1)
  traced = []
  for step in range(1, 6):
    profiler.before(step)
    traced.append(profiler.active)
    x = f(x)
    profiler.after(step, x)
  profiler.close()
  assert traced == [False, True, True, False, False]  # steps 2-3: after the compiling step 1
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))


def test_mp4_write_gives_no_fork_warning(tmp_path):
  jnp.ones(2).block_until_ready()  # JAX's threads are up: its fork hook would warn
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    media.write_mp4(str(tmp_path / "a.mp4"), np.zeros((5, 16, 16, 3), np.uint8))
    assert media.read_video(str(tmp_path / "a.mp4")).shape == (5, 16, 16, 3)
  assert not [w for w in caught if "fork" in str(w.message)], [str(w.message) for w in caught]


def test_eval_videos_default_only_for_periodic_evaluation():
  import ml_collections
  from apt2_jax.train import samples
  assert samples.num_videos(ml_collections.ConfigDict({"eval_every": 1000})) == 2
  assert samples.num_videos(ml_collections.ConfigDict({"eval_every": 0})) == 0  # smoke runs: no compile
  assert samples.num_videos(ml_collections.ConfigDict({"eval_every": 0, "eval_videos": 3})) == 3
  video = np.linspace(-1, 1, 5, dtype=np.float32)
  assert samples._as_uint8(video).tolist() == [0, 64, 128, 191, 255]  # pylint: disable=protected-access


@pytest.mark.slow  # a tiny train step and the rollout-video program compile: ~2 min on 2 busy cores
def test_eval_rollout_videos_reach_tensorboard(tmp_path):
  from apt2_jax import train
  from tests.config_files import stage1_adapt
  c = stage1_adapt.get_config("tiny")
  c.num_steps, c.eval_videos, c.progress_bar = 1, 1, False
  train.train_and_evaluate(c, str(tmp_path))
  tags = {v.tag: v for e in _events(str(tmp_path / "tensorboard")) if e.HasField("summary") for v in e.summary.value}
  gif = tags["eval/rollout"].image
  assert gif.encoded_image_string[:6] == b"GIF89a"
  assert gif.width == 2 * c.data.width and gif.height == c.data.height  # generated | ground truth
