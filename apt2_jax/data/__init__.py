"""Synthetic worlds, TFDS builders and the grain input pipeline."""
from apt2_jax.data.captions import CAPTIONS, MAX_LEN, VOCAB_SIZE, tokenize
from apt2_jax.data.controls import CONTROL_LIMITS, control_names, validate_controls
from apt2_jax.data.worlds import (WORLD_NAMES, World, WorldConfig, make_world, seed_split,
                                  split_seed)
