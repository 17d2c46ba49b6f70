"""The README's Python example runs as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(capsys):
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
  assert namespace["frames"].shape == (1, 12, 8, 8, namespace["config"].latent_channels)
  assert "(1, 12, 8, 8, 4)" in capsys.readouterr().out
