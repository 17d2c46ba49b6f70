"""Training stages: one trainer per stage family."""

# Stage name -> "module:function(config, workdir)". Add a stage by adding a line.
ENTRY_POINTS = {
    "vae": "apt2_jax.stages.vae:train_vae",
    "vae_distill": "apt2_jax.stages.vae:train_vae",
    "pretrain": "apt2_jax.train:train_and_evaluate",
    "adapt": "apt2_jax.train:train_and_evaluate",
    "distill": "apt2_jax.train:train_and_evaluate",
    "adversarial": "apt2_jax.train:train_and_evaluate",
    "long_video": "apt2_jax.train:train_and_evaluate",
    "pipeline": "apt2_jax.pipeline:run_pipeline",  # every stage in order, then the evaluation
}
