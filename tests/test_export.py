"""Export bundle: the serialised stream equals the live one; bundles reload; the sampler CLI reads them."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from apt2_jax import export, media
from apt2_jax.inference import StreamingGenerator
from test_inference import KEYS, first_image, tiny_generator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  gen = tiny_generator()
  out = str(tmp_path_factory.mktemp("bundle"))
  export.export_bundle(gen, out)
  return gen, out


def _live(gen, steps, text="a camera glides over grass"):
  frames = [gen.start(first_image(), text=text, seed=3)]
  for c in steps:
    frames.append(gen.step(c))
  return np.concatenate(frames, 1)


def test_exported_step_equals_live_step(bundle):
  gen, out = bundle
  meta = json.load(open(os.path.join(out, "bundle.json")))
  assert meta["control_type"] == "camera" and meta["model"]["control_channels"] == 20
  assert not any(f.endswith((".pkl", ".pickle")) for f in os.listdir(out))
  steps = KEYS[:4]
  live = _live(gen.fork(), steps)
  exported = export.load_bundle(out)
  got = [exported.start(first_image(), text="a camera glides over grass", seed=3)]
  got += [exported.step(c) for c in steps]
  np.testing.assert_array_equal(np.concatenate(got, 1), live)


def test_loader_imports_no_model_code(bundle):
  code = ("import sys, apt2_jax.export as e; e.read_meta(sys.argv[1]); "
          "bad = [m for m in sys.modules if m.startswith(('apt2_jax.models', 'flax', 'apt2_jax.rollout'))]; "
          "assert not bad, bad; print('ok')")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", code, bundle[1]], capture_output=True, text=True,
                          env=env, timeout=120)
  assert result.stdout.strip() == "ok", result.stderr


def test_bundle_reloads_live_and_bf16(bundle, tmp_path):
  gen, out = bundle
  again = StreamingGenerator.from_checkpoint(out)
  assert again.control_type == "camera" and (again.height, again.width) == (gen.height, gen.width)
  np.testing.assert_array_equal(_live(again, KEYS[:2]), _live(gen.fork(), KEYS[:2]))
  half = str(tmp_path / "bf16")
  export.export_bundle(gen, half, bf16=True, serialize=False)
  params = export.load_arrays(os.path.join(half, "generator.safetensors"))
  assert all(str(v.dtype) == "bfloat16" for v in params.values())
  with pytest.raises(ValueError, match="without serialised steps"):
    export.load_bundle(half)


def test_sample_cli_from_bundle(bundle, tmp_path):
  from absl import app, flags
  from apt2_jax.inference import sample
  _, out = bundle
  image = tmp_path / "first.png"
  from PIL import Image
  Image.fromarray(first_image()).save(image)
  controls = tmp_path / "controls.json"
  controls.write_text(json.dumps({"steps": [{"keys": ["w"]}, {"keys": ["a"], "text": "a camera circles over sand"}]}))
  mp4 = str(tmp_path / "out.mp4")
  argv = ["sample", f"--checkpoint={out}", f"--image={image}", f"--controls={controls}",
          "--num_frames=13", f"--out={mp4}"]
  sample.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  sample.main(argv[:1])
  assert media.read_video(mp4).shape == (13, 32, 32, 3)
  assert os.path.exists(str(tmp_path / "out.gif"))
  controls.write_text(json.dumps({"steps": [{"keys": ["w"]}, {"camera": [0, 0.3, 0, 0, 0]}]}))
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  with pytest.raises(app.UsageError, match=r"steps\[1\]\.camera\[1\]: 0\.3 is outside \[-0\.15, 0\.15\] \(tilt\)"):
    sample.main(argv[:1])
  flags.FLAGS.unparse_flags()


def test_from_training_checkpoint(tmp_path):
  """A trainer's checkpoint (EMA params + saved config) streams like the in-memory generator."""
  import ml_collections
  from apt2_jax import checkpointing
  from apt2_jax.configs import sizes
  gen = tiny_generator()
  config = ml_collections.ConfigDict({
      "model": dict(sizes.model_config("tiny", control_channels=20)),
      "vae": {"size": "tiny", "checkpoint": ""},
      "data": {"world": "camera", "height": 32, "width": 32}})
  manager = checkpointing.make_manager(str(tmp_path), save_every=1, keep=1, async_save=False)
  state = {"ema_params": gen.params, "params": jax.tree.map(np.zeros_like, gen.params)}
  checkpointing.save(manager, 1, state, config=config, force=True)
  manager.wait_until_finished()
  loaded = StreamingGenerator.from_checkpoint(str(tmp_path))
  assert loaded.dit_config == gen.dit_config and loaded.control_type == "camera"
  assert (loaded.height, loaded.width) == (32, 32)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, gen.params)  # the EMA entry
  with pytest.raises(FileNotFoundError, match="neither an export bundle"):
    StreamingGenerator.from_checkpoint(str(tmp_path / "nothing"))
