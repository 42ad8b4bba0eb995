"""A colour signature searched beside the learned features, for folders of several views of each
thing (`instret train --multi-view`, instret.config MULTI_VIEW).

The encoder learns the invariances its augmentations teach; two objects of one kind seen from
many sides are often told apart by their colours first, which a histogram keeps whatever the
viewpoint. So an encoder trained for several views searches the two together: its feature f
beside the image's colour signature c, each unit length, joined as

    [f, sqrt(w) c] / sqrt(1 + w),    cosine = (cos_f + w cos_c) / (1 + w),

with w = MULTI_VIEW["colour_weight"] (instret.config; 1: the two cosines averaged, not fitted
to any one folder), stored in encoder.pt. c is the
share of the image's pixels in each of BINS^3 colours, to the power 1/4 (rare colours, a
small red part, still count), L2-normalised; it is computed from the encoder's own input (the
upright, border-trimmed image at its input size), so queries, index builds and exported models
see the same pixels. Measured in benchmarks/README.md ("Several views of one object").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BINS = 8  # levels per channel: 512 colours
DIM = BINS**3


def colour_signature(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x S x S -> float32 N x DIM unit rows: the share of each colour, to the 1/4."""
    q = images.to(torch.int64) // (256 // BINS)
    codes = ((q[:, 0] * BINS + q[:, 1]) * BINS + q[:, 2]).flatten(1)  # N x S*S
    ones = torch.ones_like(codes, dtype=torch.float32)
    counts = ones.new_zeros((codes.shape[0], DIM)).scatter_add(1, codes, ones)  # the batch size traced, not fixed
    return F.normalize(counts**0.25, dim=1)


def with_colour(features: torch.Tensor, images: torch.Tensor, weight: float) -> torch.Tensor:
    """The learned unit features (N x D) joined with the images' colour signature at `weight`."""
    colour = colour_signature(images).to(features.device, features.dtype)
    return torch.cat([features, weight**0.5 * colour], dim=1) / (1 + weight) ** 0.5
