"""Model room: the ViT, its hybrid ResNet stem, named variants and FLOP counts."""
from vit_jax.models.registry import create, model_kwargs, names

__all__ = ['create', 'model_kwargs', 'names']
