"""Model room: the ViT, its hybrid ResNet stem, named variants and FLOP counts."""
from vit_jax.models.registry import COMPUTE_OPTIONS, create, model_kwargs, names

__all__ = ['COMPUTE_OPTIONS', 'create', 'model_kwargs', 'names']
