"""Latent pre-encoding: examples keep their features, video -> normalised latents; records."""
import jax
import numpy as np

from apt2_jax.models import vae as vae_lib
from apt2_jax.tools import encode_latents


# Tests compile many small programs: XLA's backend optimisations cost more than they save here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_encode_examples_and_records(tmp_path, monkeypatch):
  monkeypatch.setattr(vae_lib, "encode_chunked", jax.jit(
      vae_lib.encode_chunked.__wrapped__, static_argnames="model", compiler_options=FAST_COMPILE))
  config = vae_lib.vae_config("tiny", latents_mean=(0.5,) * 4, latents_std=(2.0,) * 4)
  model = vae_lib.VAE(config)
  params = vae_lib.init_params(model, jax.random.key(0), 16, 16)
  rng = np.random.default_rng(0)
  examples = [{"video": rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8),  # cut to 5 frames
               "controls": np.full((7, 2), i, np.float32), "caption": f"clip {i}", "seed": i}
              for i in range(3)]
  encoded = list(encode_latents.encode_examples(model, params, examples, batch_size=3))
  assert [e["seed"] for e in encoded] == [0, 1, 2] and "video" not in encoded[0]
  assert encoded[2]["latents"].shape == (2, 2, 2, 4)
  np.testing.assert_array_equal(encoded[1]["controls"], examples[1]["controls"])
  # Normalised posterior means of the first 5 frames, in order (one batch: one compilation).
  video = np.stack([e["video"][:5] for e in examples]).astype(np.float32) / 127.5 - 1.0
  mean, _ = vae_lib.encode_chunked(model, params, video)
  for i in range(3):
    np.testing.assert_allclose(encoded[i]["latents"], (np.asarray(mean[i]) - 0.5) / 2.0,
                               atol=1e-5)

  path = str(tmp_path / "train.array_record")
  assert encode_latents.write_records(path, encoded) == 3
  back = encode_latents.read_records(path)
  assert back[1]["caption"] == "clip 1" and back[1]["seed"] == 1
  np.testing.assert_array_equal(back[2]["latents"], encoded[2]["latents"])
