"""The toy pipeline: the stage chain is wired right (fast); the whole pipeline runs (slow)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from apt2_jax import pipeline
from apt2_jax.configs import testbed, toy_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stage_chain_points_each_stage_at_the_previous_one(tmp_path):
  config = toy_pipeline.get_config("demo")
  plan = {name: (c, sub) for name, c, sub in pipeline.stage_configs(config, str(tmp_path))}
  assert list(plan) == list(toy_pipeline.ORDER)
  path = lambda name: os.path.join(str(tmp_path), name)
  assert plan["adapt"][0].init_from == path("pretrain")
  assert plan["distill"][0].init_from == path("adapt")
  assert plan["adversarial"][0].init_from == path("distill")
  assert plan["adversarial"][0].adversarial.d_init_from == path("adapt")
  assert plan["long_video"][0].init_from == path("adversarial")
  assert plan["long_video"][0].adversarial.d_init_key == "d_params"
  assert plan["adversarial_teacher_forcing"][0].adversarial.variant == "teacher_forcing"
  assert not plan["adversarial_no_recycle"][0].adversarial.recycle
  for name, (c, _) in plan.items():
    if name != "vae":
      assert c.vae.checkpoint == path("vae"), name
      assert c.model.recycled_channels == (name != "pretrain"), name
  lv = plan["long_video"][0]
  assert lv.data.frames == 1 + 4 * lv.long_video.segment_frames * lv.long_video.num_segments
  assert not pipeline._is_done(path("vae"), plan["vae"][0])


@pytest.mark.slow  # the camera world's chain (VAE stage included); make demo runs the testbed's
def test_toy_pipeline_end_to_end(tmp_path):
  config = toy_pipeline.get_config("tiny")
  pipeline.run_pipeline(config, str(tmp_path))
  report = json.load(open(tmp_path / "report" / "report.json"))
  assert set(report["models"]) >= {"diffusion_stage1", "distilled_1nfe", "aapt"}
  assert (tmp_path / "report" / "training_curves.png").exists()
  summary = json.load(open(tmp_path / "pipeline_summary.json"))
  assert "adversarial" in summary["final_train_metrics"]


def test_testbed_pipeline_end_to_end_then_the_readme_commands_on_its_output(tmp_path):
  """`make demo`'s job (the testbed) at tiny size, then the README's commands in order on what it
  wrote: sample from the AAPT workdir, export a bundle (the CLI, from another directory), sample
  from the bundle, and the demo server answering one step of the bundle's stream."""
  config = testbed.get_config("tiny")
  pipeline.run_pipeline(config, str(tmp_path))
  report = json.load(open(tmp_path / "report" / "report.json"))
  assert set(report["claims"]) == {"gate1", "gate2", "a", "b", "c", "d"} and report["learning"]["teacher_forced"]
  assert report["learning"]["gate1"]["warp_last_db"] > 20
  assert set(report["sets"]["in_distribution"]["statistics"]["references"]) >= {"warp_last", "warp_frame0", "flat_colour"}
  assert (tmp_path / "report" / "claims.md").exists() and (tmp_path / "report" / "training_curves.png").exists()
  summary = json.load(open(tmp_path / "pipeline_summary.json"))
  assert "adversarial" in summary["final_train_metrics"]

  from absl import flags
  from apt2_jax import media
  from apt2_jax.inference import sample
  image, controls = tmp_path / "examples" / "first.png", tmp_path / "examples" / "controls.json"
  assert image.exists() and controls.exists()

  def run_sample(checkpoint, out):
    argv = ["sample", f"--checkpoint={checkpoint}", f"--image={image}", f"--controls={controls}",
            "--num_frames=9", f"--out={out}"]
    sample.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
      sample.main(argv[:1])
    finally:
      flags.FLAGS.unparse_flags()
    assert media.read_video(str(out)).shape[0] == 9
    assert os.path.exists(os.path.splitext(str(out))[0] + ".gif")

  run_sample(tmp_path / "adversarial", tmp_path / "out.mp4")
  bundle = tmp_path / "bundle"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-m", "apt2_jax.export", f"--checkpoint={tmp_path / 'adversarial'}",
                         f"--out={bundle}"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (bundle / "bundle.json").exists() and (bundle / "dit_step.jaxexport").exists()
  run_sample(bundle, tmp_path / "from_bundle.mp4")

  from apt2_jax.inference import StreamingGenerator, serve  # noqa: E402
  from test_serve import _recv_frames, _recv_json, _run
  server = serve.DemoServer(StreamingGenerator.from_checkpoint(str(bundle)), serve.ServerOptions(port=0),
                            examples={"first": (sample.load_image(str(image)), "")}).start_in_thread()
  try:
    from websockets.asyncio.client import connect

    async def one_step():
      async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
        await _recv_json(ws, "hello")
        await ws.send(json.dumps({"type": "start", "image": "example:first", "format": "raw"}))
        frames, _ = await _recv_frames(ws, 1 + 4)
        assert len(frames[-1]) == config.height * config.width * 3
    _run(one_step())
  finally:
    server.stop()


def test_pre_encoded_pool_gives_the_latents_of_encoding_each_batch():
  import jax
  import numpy as np
  from apt2_jax import sharding, train
  from apt2_jax.stages import diffusion
  from apt2_jax.train import data as train_data
  config = toy_pipeline.get_config("tiny").stages.adapt
  config.data.pool_size, config.batch_size = 3, 2  # batches wrap around the pool
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1])
  stage = diffusion.make_stage(config, mesh)
  on_the_fly = train_data.make_iterator(config, "train")
  encoded = train_data.make_iterator(config, "train")
  train.pre_encode(stage, encoded, config)
  assert "video" not in encoded.peek() and "latents" in encoded.peek()
  for _ in range(3):
    a, b = next(on_the_fly), next(encoded)
    want, _, _ = stage.inputs(stage.frozen, a)
    got, _, _ = stage.inputs(stage.frozen, b)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(a["text_tokens"], b["text_tokens"])
  config.data.source = "random_latents"
  with pytest.raises(ValueError, match="pre_encode needs config.data.source='worlds'"):
    train.pre_encode(stage, train_data.make_iterator(config, "train"), config)
