"""Model room: the ViT, its hybrid ResNet stem, named variants and FLOP counts."""
from vit_jax.models.registry import (COMPUTE_OPTIONS, create, given_overrides, names,
                                     released_name)
from vit_jax.models.vit import patch_on_image, token_grid

__all__ = ['COMPUTE_OPTIONS', 'create', 'given_overrides', 'names', 'patch_on_image',
           'released_name', 'token_grid']
