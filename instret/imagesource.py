"""Where the trainer's images come from, a batch of instance ids at a time.

ResidentImages holds the decoded set as one uint8 tensor on the training device (CIFAR-10
is 150 MB): a batch is one indexing kernel. StreamedImages holds only file paths and decodes
each batch in worker processes, pinned and copied to the device without blocking while the
previous batch computes, for datasets larger than memory. Both give the same uint8 pixels
for the same id, so a run trains to the same weights either way.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Iterator

import torch

from instret.images import DecodeDataset

GREY = 128  # stands in for a file that became unreadable after the start of training


def evenly_spaced(n: int, limit: int) -> torch.Tensor:
    """At most `limit` ids spread over 0..n-1 (all of them when n <= limit)."""
    return torch.arange(0, n, max(1, n // limit))[:limit]


def chunks(ids: torch.Tensor, batch_size: int = 512) -> list[torch.Tensor]:
    return list(ids.split(batch_size))


class ResidentImages:
    def __init__(self, images: torch.Tensor, device: torch.device):
        self.images = images.to(device)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, id_lists: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """uint8 B x 3 x S x S on the device for each list of ids, in order."""
        for ids in id_lists:
            yield self.images[ids.to(self.images.device)]


class StreamedImages:
    def __init__(
        self, paths: list[str], size: int, device: torch.device, workers: int = 2, max_pixels: int | None = None
    ):
        self.paths, self.size, self.device, self.workers = paths, size, device, workers
        self.dataset = DecodeDataset(paths, size, max_pixels, hashes=False)

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, id_lists: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """uint8 B x 3 x S x S on the device for each list of ids, in order; the workers
        decode ahead (two batches each) while the caller computes."""
        id_lists = [ids.tolist() for ids in id_lists]
        if not id_lists:
            return
        workers = self.workers if len(id_lists) > 1 else 0  # one batch: not worth starting processes
        collate = functools.partial(_stack_or_grey, size=self.size)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=id_lists,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )
        pending = None
        for images, bad in loader:
            for i, reason in bad:  # from whichever process met it: each decodes its own rows
                print(
                    f"{self.paths[i]!r}: unreadable since training began ({reason}); a grey image stands in",
                    file=sys.stderr,
                    flush=True,
                )
            # Queued behind the current step's kernels on the same stream: the host runs on to
            # decode and launch, and the copy can never be read before it lands.
            images = images.to(self.device, non_blocking=True)
            if pending is not None:
                yield pending
            pending = images
        yield pending


def _stack_or_grey(batch, size: int):
    """(uint8 B x 3 x S x S in the batch's order, [(id, reason)] of the files that failed)."""
    grey = torch.full((3, size, size), GREY, dtype=torch.uint8)
    images = torch.stack([grey if img is None else img for _, img, _, _ in batch])
    return images, [(i, reason) for i, img, _, reason in batch if img is None]
