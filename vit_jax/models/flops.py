"""Analytic FLOPs of the forward pass (2 per multiply-add, attention included), for MFU."""
from vit_jax.models.resnet import output_channels, ResNetConfig
from vit_jax.models.vit import token_grid, VisionTransformer


def _conv(out_h: int, out_w: int, k: int, c_in: int, c_out: int) -> int:
  return 2 * out_h * out_w * k * k * c_in * c_out


def resnet_flops(config: ResNetConfig, height: int, width: int, channels: int) -> int:
  """Convolutions of the BiT stem (norms, pooling and activations are not counted)."""
  root = int(64 * config.width_factor)
  h, w = -(-height // 2), -(-width // 2)
  total = _conv(h, w, 7, channels, root)
  h, w = -(-h // 2), -(-w // 2)
  c_in = root
  for stage, units in enumerate(config.num_layers):
    feats = root * 2**stage
    for unit in range(units):
      stride = 2 if stage > 0 and unit == 0 else 1
      oh, ow = -(-h // stride), -(-w // stride)
      total += _conv(h, w, 1, c_in, feats) + _conv(oh, ow, 3, feats, feats)
      total += _conv(oh, ow, 1, feats, 4 * feats)
      if c_in != 4 * feats or stride != 1:
        total += _conv(oh, ow, 1, c_in, 4 * feats)
      h, w, c_in = oh, ow, 4 * feats
  return total


def forward_flops(model: VisionTransformer, height: int, width: int, channels: int = 3) -> int:
  """FLOPs of one image's forward pass: matmuls/convs, attention scores and weighted sums."""
  total = 0
  if model.resnet is not None:
    total += resnet_flops(model.resnet, height, width, channels)
    channels = output_channels(model.resnet)
  ph, pw = model.patch_size
  gh, gw = token_grid(model, height, width)
  grid = gh * gw
  d, m = model.hidden_size, model.mlp_dim
  total += 2 * grid * ph * pw * channels * d
  tokens = grid + (model.classifier == 'token')
  per_layer = 2 * tokens * d * 4 * d + 2 * 2 * tokens * tokens * d + 2 * 2 * tokens * d * m
  total += model.num_layers * per_layer
  if model.classifier == 'map':
    total += 2 * tokens * d * 2 * d + 2 * 2 * d * d + 2 * 2 * tokens * d + 2 * 2 * d * m
  if model.representation_size:
    total += 2 * d * model.representation_size
    d = model.representation_size
  return total + 2 * d * model.num_classes
