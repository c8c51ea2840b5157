"""Checkpoints: Orbax workdirs (manager), the released `.npz` layout (npz), timm's safetensors
(timm_layout), and loading any of them for a model (restore)."""


def is_npz(path: str) -> bool:
  """A released-layout file, by its name alone: light, so commands check flags before loading."""
  return path.lower().endswith('.npz')
