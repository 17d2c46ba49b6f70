"""Stage 3: adversarial post-training with student forcing (AAPT).

G starts from stage 2 (`init_from`), D's backbone from stage 1 (`adversarial.d_init_from`). Paper
values: relativistic loss, approximated R1/R2 with lambda = 1000 and sigma = 0.1 (a standard
deviation), Adam b1 = 0, b2 = 0.9 (RMSProp alpha = 0.9), lr 3e-6, D's t ~ U(0, 1) unshifted.
Ablations as config arguments: `variant=teacher_forcing`, `recycle=0` (no recycling),
`detach_cache=1` (Self-Forcing-style cache), `loss=non_saturating`. Fields:
`apt2_jax/configs/adversarial.py`.

  python -m apt2_jax.main --config=experiments/stage3_adversarial.py:small --workdir=/tmp/s3_small \\
      --config.vae.checkpoint=/tmp/vae_small --config.init_from=/tmp/s2_small \\
      --config.adversarial.d_init_from=/tmp/s1_small
  # the teacher-forcing ablation:
  python -m apt2_jax.main --config=experiments/stage3_adversarial.py:small,variant=teacher_forcing ...
"""
from apt2_jax.configs import adversarial


def get_config(arg: str = "small"):
  return adversarial.adversarial_config(arg)
