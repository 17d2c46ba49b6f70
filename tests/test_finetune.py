"""Fine-tuning from a public Wan2.1 checkpoint on a folder of your own videos, at tiny size.

Everything is built here, nothing is downloaded: a random Wan DiT and VAE saved by diffusers and a
random umT5 encoder with its tokenizer saved by transformers, laid out as the Wan2.1 diffusers
folder is (`model_index.json`, `transformer/` in two shards with an index, `vae/`,
`text_encoder/`, `tokenizer/`), and three short MP4s with captions.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from apt2_jax.convert import common as convert_common  # noqa: E402
from apt2_jax.convert import wan_dit  # noqa: E402
from apt2_jax.generation import prompt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny size's architecture (apt2_jax/configs/sizes.py), so the stage configs need no model
# overrides besides the text input (embeddings) and no control channels.
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4,
           out_channels=4, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2)
TEXT_DIM, TEXT_LEN = 32, 8
WORDS = ("a", "red", "green", "blue", "ball", "cube", "rolls", "spins", "over", "grass", "sand")
CAPTIONS = {"ball": "a red ball rolls over grass", "cube": "a blue cube spins over sand",
            "ramp": "green grass"}


def _tiny_tokenizer(folder):
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                              unk_token="<unk>")
  fast.save_pretrained(folder)
  return len(vocab)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
  """A tiny random Wan2.1 T2V pipeline folder in diffusers' layout."""
  root = tmp_path_factory.mktemp("wan")
  torch.manual_seed(0)
  dit = diffusers.WanTransformer3DModel(**DIT).eval()
  with torch.no_grad():
    for p in dit.parameters():  # zero-init pieces (norms, tables) would hide mapping errors
      p.add_(0.05 * torch.randn_like(p))
  dit.save_pretrained(root / "transformer", max_shard_size="40KB")  # sharded, with an index
  vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                   latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
  vae.save_pretrained(root / "vae")
  vocab = _tiny_tokenizer(root / "tokenizer")
  encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=vocab, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
      relative_attention_num_buckets=8)).eval()
  encoder.save_pretrained(root / "text_encoder")
  (root / "model_index.json").write_text(json.dumps({
      "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
      "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
      "tokenizer": ["transformers", "PreTrainedTokenizerFast"]}))
  return root, dit


def _write_video(path, frames):
  import imageio_ffmpeg
  writer = imageio_ffmpeg.write_frames(str(path), frames.shape[2:0:-1], fps=8, codec="libx264",
                                       macro_block_size=1, output_params=["-loglevel", "error"])
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  """Three 13-frame 40x48 MP4s (moving gradients), each with a caption file; one uncaptioned."""
  folder = tmp_path_factory.mktemp("videos")
  y, x = np.mgrid[:40, :48]
  for k, name in enumerate(("ball", "cube", "ramp")):
    frames = np.stack([np.stack([(x * 5 + t * (8 + 4 * k)) % 256, (y * 6 + 40 * k) % 256,
                                 np.full_like(x, 60 * k + t * 10)], -1) for t in range(13)]).astype(np.uint8)
    _write_video(folder / f"{name}.mp4", frames)
    (folder / f"{name}.txt").write_text(CAPTIONS[name])
  _write_video(folder / "silent.mp4", np.full((13, 40, 48, 3), 128, np.uint8))
  return folder


def _fresh_copy(videos, folder):
  """The videos and captions alone in a test's own folder: another test's caption sidecars
  (`embed_captions` writes them next to the videos) must not be counted as already embedded."""
  folder.mkdir()
  for path in videos.iterdir():
    if path.suffix in (".mp4", ".txt"):
      shutil.copy(path, folder / path.name)
  return folder


# ------------------------------------------------------------------------------------------------
# Weights: sharded folders, variants, init_from
# ------------------------------------------------------------------------------------------------

def test_sharded_folder_read_through_index_ignoring_stray_files(wan, tmp_path):
  root, dit = wan
  folder = root / "transformer"
  shards = sorted(p.name for p in folder.glob("*.safetensors"))
  assert len(shards) >= 2 and (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
  # A stray file beside the shards (an old single-file save, here with a wrong tensor) is ignored.
  from safetensors.numpy import save_file
  stray = tmp_path / "copy"
  os.makedirs(stray)
  for name in os.listdir(folder):
    os.symlink(folder / name, stray / name)
  save_file({"proj_out.weight": np.zeros((3, 3), np.float32)}, str(stray / "diffusion_pytorch_model.fp16.safetensors"))
  assert [os.path.basename(p) for p in convert_common.weight_files(str(stray))] == shards
  params, config, report = wan_dit.import_dit(str(stray), jax.random.key(0), recycled_channels=False)
  assert not report.new and not report.dropped and not report.reshaped
  np.testing.assert_array_equal(params["proj_out"]["kernel"], dit.proj_out.weight.detach().numpy().T)
  np.testing.assert_array_equal(params["blocks"]["ffn_net_2"]["bias"][1],
                                dit.blocks[1].ffn.net[2].bias.detach().numpy())
  # The pipeline folder resolves to its transformer.
  again, _, _ = wan_dit.import_dit(str(root), jax.random.key(0), recycled_channels=False)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # A shard the index names but the folder lacks is an error, not a silent gap.
  os.remove(stray / shards[0])
  with pytest.raises(FileNotFoundError, match="named by the index"):
    convert_common.weight_files(str(stray))


def test_i2v_and_other_variants_are_refused(tmp_path):
  torch.manual_seed(0)
  i2v = diffusers.WanTransformer3DModel(**dict(DIT, in_channels=2 * 4 + 4, image_dim=16,
                                               added_kv_proj_dim=48))
  i2v.save_pretrained(tmp_path / "i2v")
  with pytest.raises(ValueError, match="image-conditioned Wan transformer"):
    wan_dit.import_dit(str(tmp_path / "i2v"), jax.random.key(0))
  cfg = dict(DIT, _class_name="WanTransformer3DModel", in_channels=12)  # unknown extra inputs
  with pytest.raises(ValueError, match="in_channels=12 with out_channels=4"):
    wan_dit.source_input_layout(cfg)
  with pytest.raises(ValueError, match="WanVACETransformer3DModel is not supported"):
    wan_dit.source_input_layout(dict(cfg, _class_name="WanVACETransformer3DModel"))
  assert wan_dit.source_input_layout(dict(cfg, in_channels=4)) == {"noise": (0, 4)}


def _stage1_config(**data):
  from apt2_jax.configs import diffusion
  c = diffusion.adapt_config("tiny")
  c.model.caption_vocab_size = 0
  c.model.control_channels = 0
  c.data.control_dim = 0
  c.data.update(data)
  return c


def test_init_from_diffusers_folder_widens_patch_embedding(wan, devices, caplog):
  import logging

  from apt2_jax import sharding
  from apt2_jax.models.dit import unbox
  from apt2_jax.stages import diffusion
  from apt2_jax.train import validate
  root, dit = wan
  config = _stage1_config(source="random_latents")
  config.init_from = str(root)
  validate.validate_config(config)  # a diffusers folder is a valid init_from
  mesh = sharding.make_mesh(config.mesh, devices)
  with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
    stage = diffusion.make_stage(config, mesh)
    state = jax.jit(lambda r: unbox(stage.init_state(r)))(jax.random.key(0))
    fresh = np.asarray(state["params"]["patch_embedding"]["kernel"])
    # The absl logger's own level: flags parsed by another test in this process set it to WARNING.
    with caplog.at_level(logging.INFO, logger="absl"):
      params = stage.load_pretrained(state)["params"]
  assert "conversion report" in caplog.text and "new input channels: recycled" in caplog.text
  kernel = np.asarray(params["patch_embedding"]["kernel"])
  wan_kernel = dit.patch_embedding.weight.detach().numpy().transpose(2, 3, 4, 1, 0)
  np.testing.assert_array_equal(kernel[..., :4, :], wan_kernel)  # noise channels: Wan's
  assert kernel.shape == fresh.shape and np.std(kernel[..., 4:, :]) > 0  # recycled: random, not zero
  np.testing.assert_array_equal(np.asarray(params["blocks"]["attn1"]["to_q"]["kernel"][1]),
                                dit.blocks[1].attn1.to_q.weight.detach().numpy().T)
  # A run whose model is not the folder's architecture gets every differing field named.
  config.model.num_layers = 3
  with pytest.raises(ValueError, match=r"model.num_layers=3 but the folder has 2"):
    with sharding.use_mesh(mesh, sharding.rules_from_config(config)):
      stage = diffusion.make_stage(config, mesh)
      stage.load_pretrained(jax.jit(lambda r: unbox(stage.init_state(r)))(jax.random.key(0)))


# ------------------------------------------------------------------------------------------------
# Text: the umT5 encoder, the caption tool, prompts
# ------------------------------------------------------------------------------------------------

def test_text_encoder_matches_wan_pipeline_and_feeds_prompts(wan):
  from apt2_jax.models import DiTConfig
  root, _ = wan
  encoder = prompt.TextEncoder(str(root), max_length=TEXT_LEN)
  out = encoder.encode(["a red ball", "blue  cube &amp; sand"])
  assert out.shape == (2, TEXT_LEN, TEXT_DIM) and out.dtype == np.float32
  # Wan: tokens + </s>, embeddings after them zero ("&amp;" is unescaped to "&", an unknown word).
  tokens = encoder.tokenizer(["a red ball", "blue cube & sand"], padding="max_length", max_length=TEXT_LEN,
                             return_tensors="pt")
  with torch.no_grad():
    ref = encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
  for i, n in enumerate((4, 5)):
    np.testing.assert_allclose(out[i, :n], ref[i, :n].numpy(), rtol=1e-5, atol=1e-6)
    assert not out[i, n:].any() and np.abs(out[i, :n]).min(axis=-1).all()
  dit = DiTConfig(latent_channels=4, dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_dim=TEXT_DIM)
  with pytest.raises(ValueError, match="--text_encoder"):
    prompt.prepare("a red ball", dit, 1, 16)
  try:
    prompt.set_text_encoder(encoder)
    text = prompt.prepare("a red ball", dit, 2, 16)
    np.testing.assert_array_equal(text, np.repeat(out[:1], 2, 0))
    assert not prompt.prepare("", dit, 1, 16).any()  # the empty prompt stays zeros
  finally:
    prompt.set_text_encoder(None)


def test_embed_captions_build_and_read_every_stage(wan, videos, tmp_path):
  from apt2_jax.configs import adversarial
  from apt2_jax.data import build
  from apt2_jax.tools import embed_captions
  from apt2_jax.train import data as train_data
  root, _ = wan
  folder = _fresh_copy(videos, tmp_path / "videos")
  encoder = prompt.TextEncoder(str(root), max_length=TEXT_LEN)
  manifest = embed_captions.embed_folder(str(folder), encoder, batch_size=2, progress=False)
  assert (manifest["embedded"], manifest["uncaptioned"], manifest["shape"]) == (3, 1, [TEXT_LEN, TEXT_DIM])
  np.testing.assert_array_equal(np.load(folder / "ball.npy"), encoder.encode([CAPTIONS["ball"]])[0])
  assert embed_captions.embed_folder(str(folder), encoder, progress=False)["kept"] == 3  # resumes
  builder = build.build_local(str(folder), str(tmp_path / "data"), "mine", num_frames=9, clip_stride=4,
                              height=32, width=32, vae=str(root / "vae"))
  assert builder.info.splits["train"].num_examples == 8  # 4 files x clips at 0 and 4
  record = builder.as_data_source()["train"][0]
  assert record["latents"].shape == (3, 4, 4, 4) and record["text_embedding"].shape == (TEXT_LEN, TEXT_DIM)
  data = dict(source="tfds", tfds_name="apt2_local_videos/mine", data_dir=str(tmp_path / "data"))
  # Stage 1 (stored latents), stage 1 encoding on the fly, stage 3 (a shorter clip).
  batch = next(train_data.make_iterator(_stage1_config(**data), "train"))
  assert batch["latents"].shape == (8, 3, 4, 4, 4) and batch["text_tokens"].shape == (8, TEXT_LEN, TEXT_DIM)
  assert batch["controls"].shape == (8, 9, 0)
  batch = next(train_data.make_iterator(_stage1_config(latents="encode", **data), "validation"))
  assert batch["video"].shape == (8, 9, 32, 32, 3) and "latents" not in batch
  c3 = adversarial.adversarial_config("tiny")
  c3.model.update(caption_vocab_size=0, control_channels=0)
  c3.data.update(dict(data, control_dim=0, frames=5))
  batch = next(train_data.make_iterator(c3, "train"))
  assert batch["latents"].shape == (c3.batch_size, 2, 4, 4, 4)
  with pytest.raises(ValueError, match="model.control_channels=0"):
    c3.model.control_channels = 20
    train_data.make_iterator(c3, "train")


# ------------------------------------------------------------------------------------------------
# The README's commands, in order
# ------------------------------------------------------------------------------------------------

def _run(args, cwd):
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  shown = [line for line in (proc.stdout + proc.stderr).splitlines()  # with pytest -s
            if any(w in line for w in ("embedded", "built", "report", "new (", "dropped (", "reshaped (",
                                       "wrote", "loss", "skipped"))]
  print(f"$ python -m {' '.join(args[:2])} ...\n  " + "\n  ".join(shown[-12:]))
  return proc.stdout + proc.stderr


@pytest.mark.slow
def test_finetune_commands_end_to_end(wan, videos, tmp_path):
  """Captions embedded -> dataset built (latents pre-encoded) -> stage 1 runs two steps from the
  Wan init -> stages 2 and 3 one step each -> `sample` writes a video from stage 3 with a text
  prompt through the umT5 encoder."""
  root, _ = wan
  folder = _fresh_copy(videos, tmp_path / "videos")
  wan_dir, data, runs = str(root), str(tmp_path / "data"), tmp_path / "runs"
  out = _run(["apt2_jax.tools.embed_captions", f"--text_encoder={wan_dir}", f"--folder={folder}",
              f"--max_length={TEXT_LEN}"], ROOT)
  assert "embedded 3 captions" in out
  out = _run(["apt2_jax.data.build", "--world=local", f"--folder={folder}", f"--data_dir={data}",
              "--config=mine", "--num_frames=9", "--clip_stride=4", "--height=32", "--width=32",
              f"--vae={wan_dir}/vae"], ROOT)
  assert "'train': 8" in out and "latents" in out and "text_embedding" in out
  # The README's DATA_FLAGS at tiny size (+ the tiny model taking embeddings); stages 2 and 3
  # skip the final evaluation to save compiles.
  common = ["--config.data.source=tfds", "--config.data.tfds_name=apt2_local_videos/mine",
            f"--config.data.data_dir={data}", "--config.data.height=32", "--config.data.width=32",
            "--config.data.frames=9", f"--config.vae.checkpoint={wan_dir}/vae",
            "--config.model.control_channels=0", "--config.data.control_dim=0",
            "--config.model.dtype=bfloat16", "--config.model.remat_policy=full", "--config.model.query_chunk=1",
            "--config.batch_size=2", "--config.microbatches=2", "--config.eval.batch_size=1",
            "--config.model.caption_vocab_size=0"]
  out = _run(["apt2_jax.main", "--config=experiments/stage1_adapt.py:tiny", f"--workdir={runs}/s1",
              f"--config.init_from={wan_dir}", "--config.num_steps=2", *common], ROOT)
  assert "conversion report" in out and "new input channels: recycled" in out
  losses = {m["step"]: m["train/loss"] for m in map(json.loads, open(runs / "s1" / "metrics.jsonl"))
            if "train/loss" in m}
  assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
  evals = [m for m in map(json.loads, open(runs / "s1" / "metrics.jsonl")) if any(k.startswith("eval/") for k in m)]
  assert evals and all(np.isfinite(v) for v in evals[-1].values()), evals
  _run(["apt2_jax.main", "--config=experiments/stage2_distill.py:tiny", f"--workdir={runs}/s2",
        f"--config.init_from={runs}/s1", "--config.num_steps=1", "--config.eval_at_end=false", *common], ROOT)
  _run(["apt2_jax.main", "--config=experiments/stage3_adversarial.py:tiny", f"--workdir={runs}/s3",
        f"--config.init_from={runs}/s2", f"--config.adversarial.d_init_from={runs}/s1",
        "--config.num_steps=1", "--config.eval_at_end=false", *common], ROOT)
  for stage in ("s2", "s3"):
    assert any("train/loss" in line for line in open(runs / stage / "metrics.jsonl")), stage
  from PIL import Image
  Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "first.png")
  out = _run(["apt2_jax.inference.sample", f"--checkpoint={runs}/s3", f"--image={tmp_path}/first.png",
              "--text=a red ball rolls over grass", f"--text_encoder={wan_dir}", "--num_frames=9",
              f"--out={tmp_path}/out.mp4"], ROOT)
  from apt2_jax.data import builders
  video = builders.read_video(str(tmp_path / "out.mp4"))
  assert video.shape == (9, 32, 32, 3), out
