"""Drift and control error against the synthetic worlds' oracle, side by side for several models.

    models = {"diffusion_32": model_spec_from_workdir(STAGE1, vae_workdir=VAE, num_steps=32,
                                                      shift=24.0, guidance=3.0),
              "aapt": model_spec_from_workdir(STAGE4, vae_workdir=VAE)}
    report = evaluate_models(models, world="camera", num_worlds=2, seconds=(60, 300), out_dir=DIR)

For each held-out `test` world (`worlds.split_seed("test", k)`) we draw one long control
trajectory, render the oracle (the frames a perfect model draws for those controls), encode the
oracle's frame 0 with each model's VAE and stream the model through `apt2_jax.generation.stream`
(the one path from weights to frames, as the `StreamingGenerator` does) in fixed-size chunks that
carry the KV cache, decoding each latent frame with the stream's `decode`: memory stays bounded for
any duration. Every model of a world sees the same raw controls and the same per-step noise (the
stream's noise convention, seeded per world), so the comparison is paired.

Metrics, summaries and references: `report.DEFINITIONS` (embedded in report.json).

Throughput: each sampler is compiled ahead of time (`jit(...).lower(...).compile()`), then the
DiT chunks and the VAE decode steps are timed with `block_until_ready` on one stream (batch 1):
`dit_step_s` and `decode_step_s` (including the copy of the 4 frames to the host) per latent
frame, and `frames_per_s` of video. Figures from `apt2_jax.benchmark` can be passed in
`ModelSpec.benchmark` and are copied alongside.

Outputs under `out_dir`: `report.json` (all numbers, curves per model and world and their mean
over worlds), `summary.md`, `drift_psnr.png`, `drift_ssim.png`, `control_error.png` (camera) or
`figure_error.png` (puppet), and `videos/`: `{model}_world{k}.mp4` (the whole rollout, generated |
oracle), `{model}_world{k}.gif` (the first seconds, under 1 MB) and `world{k}_all.gif` (oracle
and every model side by side).

Modules:
  metrics.py     psnr, ssim, ssim_map, masked_mean_ssim, phase_correlation, figure metrics
  oracle.py      held-out worlds and their long trajectories, the oracle, the region visible in frame 0
  references.py  the VAE's reconstruction (ceiling) and a frozen frame 0 (floor)
  sampler.py     ModelSpec (a `generation.Generator` + sampler settings), the per-model stream
  report.py      summaries, the good horizon, report.json, the summary table, `DEFINITIONS`
  figures.py     side-by-side videos, GIFs, drift plots
  run.py         evaluate_models

The testbed (a 2-core CPU trains every AAPT stage far enough to test the paper's claims against the
panorama world's exact oracle; pass criteria fixed before training):
  drift.py       psnr_known (frame 0's content: the good horizon's metric), psnr_recent (secondary),
                 motion_ratio (bursts), blur, colour_drift, the good horizon, per-bin / per-latent
                 summaries, the references (oracle, copy-last, frozen)
  camera_motion.py  the commanded camera motion (homographies, centre shift), warping, warp_error,
                 the motion estimate (motion_scales), the psnr_recent region (windowed_recent)
  claims.py      the claims (a)-(d) with their fixed criteria, verdicts over every seed and set
  testbed.py     evaluate_testbed: two fixed evaluation sets x noise seeds, report.json, claims.md,
                 drift plots, GIFs
  learning.py    stage1_learning_check: teacher-forced prediction vs copy-last, the rollout's motion
"""
from apt2_jax.evaluation.figures import GIF_MAX_BYTES, _label, plot_curves, side_by_side, write_small_gif
from apt2_jax.evaluation.metrics import (FIGURE_THRESHOLD, PSNR_CAP, figure_mask, figure_metrics,
                                         masked_mean_ssim, phase_correlation, psnr, ssim, ssim_map)
from apt2_jax.evaluation.oracle import (TestWorld, _camera_within_limits, held_out_worlds, long_controls,
                                        render_oracle, visible_mask, world_background)
from apt2_jax.evaluation.references import (REFERENCE_SECONDS, frozen_frame_curves, vae_reconstruction)
from apt2_jax.evaluation.report import (DEFINITIONS, LATENT_CURVES, RELATIVE_HORIZON_DB, SUMMARY_WINDOW_S,
                                        _jsonable, good_horizon, summarize, summary_table)
from apt2_jax.evaluation.run import evaluate_models
from apt2_jax.evaluation.models import (FRAMES_PER_LATENT, ModelSpec, ModelStream, chunk_controls,
                                        model_spec_from_workdir)
from apt2_jax.evaluation.claims import CLAIMS, ROLES, claims_table, evaluate_claims
from apt2_jax.evaluation.learning import stage1_learning_check, teacher_forced_check
from apt2_jax.evaluation.testbed import (IN_DISTRIBUTION, UNSEEN_APPEARANCE, EvalSet, TestbedConfig,
                                         evaluate_testbed)
