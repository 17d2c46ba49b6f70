"""The camera world's toy pipeline config: ray-map controls in every DiT stage, and a VAE trained
on clips as long as the DiT's."""
import pytest

from apt2_jax.configs import toy_pipeline


@pytest.mark.parametrize("variant", ["tiny", "demo", "full"])
def test_rays_controls_and_vae_clips_as_long_as_the_dit_clips(variant):
  config = toy_pipeline.get_config(variant)
  short = [name for name in config.order if name not in ("vae", "long_video")]
  for name in config.order[1:]:
    stage = config.stages[name]
    assert stage.data.control_encoding == "rays" and stage.model.control_channels == 24, name
    assert stage.data.world == "camera", name
  frames = {config.stages[name].data.frames for name in short}
  assert frames == {config.stages.vae.data.frames}, (variant, frames)
  assert config.stages.vae.data.world == "camera" and config.stages.vae.data.source == "worlds"
