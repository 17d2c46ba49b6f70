"""Synthetic worlds, TFDS builders and the grain input pipeline (see DESIGN.md, section 2)."""
from apt2_jax.data.captions import CAPTIONS, MAX_LEN, VOCAB_SIZE, tokenize
from apt2_jax.data.controls import (CONTROL_LIMITS, camera_control_from_keys, camera_ray_maps,
                                    control_channels, control_maps, latent_controls, pose_maps,
                                    validate_controls)
from apt2_jax.data.worlds import (WORLD_NAMES, World, WorldConfig, make_world, seed_split,
                                  split_seed)
