"""A reference Instance Discrimination loop written straight from docs/method.md, in plain PyTorch.

No instret code: torchvision's per-sample transforms in a DataLoader (the authors' style),
the exact non-parametric softmax over a memory bank, the momentum update after each step,
and weighted kNN by a dense product with the whole bank (the authors' procedure). Used by
benchmarks/fidelity.py and benchmarks/train_throughput.py as the thing instret is measured
against.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T


class SmallCNN(nn.Module):
    """The same layers as instret's `small` backbone + head, written out here (no instret code)."""

    def __init__(self, low_dim: int = 128, w: int = 32):
        super().__init__()

        def block(cin, cout, relu=True):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
            return layers + [nn.ReLU(inplace=True)] if relu else layers

        self.net = nn.Sequential(
            *block(3, w // 2),
            *block(w // 2, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *block(4 * w, 4 * w, relu=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, low_dim),
        )

    def forward(self, x):
        return F.normalize(self.net(x), dim=1)


class IndexedImages(torch.utils.data.Dataset):
    """uint8 N x 3 x H x W images -> (augmented view, index)."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = T.functional.to_pil_image(self.images[i])
        return self.transform(img), i


def paper_transform(size: int, mean, std, flip: bool = True):
    steps = [T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomGrayscale(p=0.2)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def dense_knn_predict(queries, bank, bank_labels, num_classes, k=200, sigma=0.1, batch=100):
    """The authors' kNN (lemniscate.pytorch, test.py `kNN`), step for step: per batch of 100
    test features, a dense product with the transposed bank, topk, a one-hot of the
    neighbours' labels weighted by exp(s / sigma), summed per class, sorted."""
    train_features = bank.t().contiguous()  # D x n, as the authors keep it
    one_hot = torch.zeros(batch * k, num_classes, device=bank.device)  # the authors': .cuda()
    preds = []
    for start in range(0, len(queries), batch):
        features = queries[start : start + batch]
        b = len(features)
        dist = torch.mm(features, train_features)  # b x n
        yd, yi = dist.topk(k, dim=1, largest=True, sorted=True)
        candidates = bank_labels.view(1, -1).expand(b, -1)
        retrieval = torch.gather(candidates, 1, yi)
        one_hot.resize_(b * k, num_classes).zero_()
        one_hot.scatter_(1, retrieval.view(-1, 1), 1)
        yd_transform = yd.clone().div_(sigma).exp_()
        probs = torch.sum(torch.mul(one_hot.view(b, -1, num_classes), yd_transform.view(b, -1, 1)), 1)
        _, predictions = probs.sort(1, True)
        preds.append(predictions[:, 0])
    return torch.cat(preds)


@torch.no_grad()
def embed(model, images, mean, std, batch=500):
    model.eval()
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    out = [model((images[i : i + batch].float() / 255 - m) / s) for i in range(0, len(images), batch)]
    model.train()
    return torch.cat(out)


def train_reference(
    model: nn.Module,
    images,
    labels,
    test_images,
    test_labels,
    *,
    epochs,
    mean,
    std,
    batch_size=128,
    lr=0.03,
    tau=0.1,
    bank_momentum=0.5,
    low_dim=128,
    workers=2,
    seed=0,
    flip=True,
    log=print,
):
    """Train `model` (ending in an L2-normalised low_dim output); returns per-epoch rows."""
    torch.manual_seed(seed)
    n = len(images)
    bank = F.normalize(torch.randn(n, low_dim), dim=1)
    loader = torch.utils.data.DataLoader(
        IndexedImages(images, paper_transform(images.shape[-1], mean, std, flip)),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    rows = []
    for epoch in range(epochs):
        for g in opt.param_groups:  # lr x0.1 at 60 % and 80 % of the epochs (120, 160 of 200)
            g["lr"] = lr * 0.1 ** sum(epoch >= round(f * epochs) for f in (0.6, 0.8))
        start, seen, total = time.perf_counter(), 0, 0.0
        for x, idx in loader:
            f = model(x)
            loss = F.cross_entropy(f @ bank.T / tau, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                mixed = bank[idx] * bank_momentum + f.detach() * (1 - bank_momentum)
                bank[idx] = F.normalize(mixed, dim=1)
            seen += len(idx)
            total += float(loss.detach()) * len(idx)
        seconds = time.perf_counter() - start
        row = {"epoch": epoch + 1, "loss": total / seen, "seconds": seconds, "images_per_s": seen / seconds}
        rows.append(row)
        log(f"reference epoch {epoch + 1}/{epochs} loss {row['loss']:.4f} {row['images_per_s']:.0f} img/s")
    keys = embed(model, images, mean, std)
    queries = embed(model, test_images, mean, std)
    pred = dense_knn_predict(queries, keys, labels, int(labels.max()) + 1, sigma=tau)
    return rows, float((pred == test_labels).float().mean())
