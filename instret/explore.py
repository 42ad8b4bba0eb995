"""What the features learned, as numbers the walkthrough notebook draws: neighbours, kNN
predictions, similarities of augmented copies, 2-D maps. Everything runs on resident uint8
image tensors (ImageSet.images) and plain feature tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from instret.augment import Augment, channel_stats
from instret.encoder import Encoder, LoadedEncoder, calibrated_copy, embed_images
from instret.imagesource import evenly_spaced
from instret.knn import knn_vote, torch_search


def untrained_encoder(arch: str, low_dim: int, images: torch.Tensor, seed: int = 0) -> LoadedEncoder:
    """The network a run starts from (same arch and seed), BatchNorm statistics estimated on
    the images, so that "before training" is the fair untrained baseline, not a broken one."""
    torch.manual_seed(seed)
    model = Encoder(arch, low_dim, images.shape[-1])
    mean, std = channel_stats(images.split(512))
    calibration = images[evenly_spaced(len(images), 4096)].split(512)
    return LoadedEncoder(calibrated_copy(model, calibration, mean, std), mean, std, fingerprint="untrained")


def features(encoder: LoadedEncoder, images: torch.Tensor) -> torch.Tensor:
    return embed_images(encoder.model, images, encoder.mean, encoder.std)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels as features (centred, L2-normalised): the baseline every encoder should beat."""
    x = images.flatten(1).float()
    x = x - x.mean(dim=0)
    return torch.nn.functional.normalize(x, dim=1)


def neighbours(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool = False):
    """(similarities Q x k, key indices Q x k), best first. exclude_self: queries are keys[i]."""
    sims, ids = torch_search(queries, keys, k + int(exclude_self))
    if exclude_self:
        sims, ids = sims[:, 1:], ids[:, 1:]
    return sims, ids


def knn_predict(
    sims: torch.Tensor, ids: torch.Tensor, key_labels: torch.Tensor, num_classes: int, sigma: float = 0.1
) -> torch.Tensor:
    """The weighted kNN vote of docs/method.md over found neighbours: the predicted class per query."""
    return knn_vote(sims, key_labels[ids], num_classes, sigma).argmax(dim=1)


def augmented_pair_similarities(encoder: LoadedEncoder, images: torch.Tensor, augment: Augment, seed: int = 0):
    """Cosine similarity of two augmented copies of the same image (one per image), and of
    copies of two different images (image i against image i+1): two 1-D arrays."""
    g = torch.Generator().manual_seed(seed)
    model = encoder.model.eval()
    with torch.no_grad():
        a = model(augment(images, g))
        b = model(augment(images, g))
    same = (a * b).sum(dim=1)
    different = (a * b.roll(1, dims=0)).sum(dim=1)
    return same.numpy(), different.numpy()


def tsne_2d(feats: torch.Tensor, seed: int = 0, pca_dims: int = 50) -> np.ndarray:
    """A 2-D t-SNE map (scikit-learn) of the rows, after PCA to at most pca_dims dimensions."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = feats.numpy().astype(np.float64)
    if x.shape[1] > pca_dims:
        x = PCA(pca_dims, random_state=seed).fit_transform(x)
    return TSNE(2, init="pca", perplexity=30, random_state=seed).fit_transform(x)
