"""The evaluation: generators streamed on the synthetic worlds against their exact oracle, beside
references, with the gates and claims fixed before training. One framework for every world.

    python -m apt2_jax.evaluation --models=aapt=/runs/stage4,distilled=/runs/stage2 --world=torus --out=/tmp/eval

    models = {"aapt_short": model_spec_from_workdir(STAGE3), "distilled": model_spec_from_workdir(STAGE2)}
    report = evaluate(models, EvalConfig(world="camera", seconds=60.0, roles={...}), out_dir=DIR)

Modules, in the order a frame passes through them:
  oracle.py         the evaluation sets and worlds (one definition for every world), long
                    trajectories, the oracle, the known and recent regions, the commanded motion
  models.py         ModelSpec (a `generation.Generator` + sampler settings); ModelStream, the
                    model's `inference.StreamingGenerator` (the one path from weights to frames), timed
  references.py     the references through the models' codec (`drift.REFERENCES`: oracle, warp-last,
                    one step back, flat colour, frozen frame 0, warp-frame-0; the warp ones where the
                    world has an exact warp), the codec against the flat colour
  metrics.py        psnr, ssim, phase correlation, the puppet figure metrics
  camera_motion.py  the commanded camera motion (homographies), warping, the motion estimate
  drift.py          per-frame metrics (psnr_known, psnr_recent, psnr, warp error, motion scale, blur,
                    colour drift) and summaries per bin, latent frame and late segment
  horizon.py        the horizon rule (first and last crossing of a full 1-s window), its threshold
                    from the references, bootstrap statistics over worlds
  gates.py          Gate 1, Gate 2 and claims (a)-(d), the EMA rule: criteria fixed in code
  claims.py         the claim roles, the long-evaluation factor, the learning check's paragraph, and
                    the earlier per-cell claims logic on drift summaries
  learning.py       the stage-1 learning check (teacher-forced prediction vs warp-last, rollout motion)
  figures.py        GIFs and MP4s beside the oracle, the drift plot
  report.py         report.json and claims.md
  run.py            EvalConfig and `evaluate`: the run over sets, worlds, noise seeds and models
  __main__.py       the command line (`--models`, `--world`, `--seconds`, ...)
"""
from apt2_jax.evaluation.metrics import (FIGURE_THRESHOLD, PSNR_CAP, figure_mask, figure_metrics,
                                         masked_mean_ssim, phase_correlation, psnr, ssim, ssim_map)
from apt2_jax.evaluation.models import (FRAMES_PER_LATENT, ModelSpec, ModelStream, chunk_controls,
                                        model_spec_from_workdir)
from apt2_jax.evaluation.oracle import (EVAL_SETS, HELD_OUT, IN_DISTRIBUTION, UNSEEN_APPEARANCE, EvalSet, Target,
                                        TestWorld, default_eval_sets, eval_worlds, long_controls, make_target,
                                        render_oracle, visible_mask, world_background)
from apt2_jax.evaluation.run import EvalConfig, evaluate
