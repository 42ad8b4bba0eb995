"""A run's neighbourhood discovery across its rounds: what the Trainer carries between epochs
and checkpoints (the rules themselves are instret.neighbours' functions)."""

from __future__ import annotations

import time

import torch

from instret import neighbours
from instret.config import TrainConfig
from instret.progress import log


class NeighbourhoodDiscovery:
    """Each row's positives (n x K, -1 unused; None before the first round), the rounds run,
    whether growth stopped, and each row's cosine between its last augmented view and its bank
    row, which calibrates the mutual rule and the multi-view check."""

    def __init__(self, rows: int, device: torch.device):
        self.neighbourhoods: torch.Tensor | None = None
        self.rounds = 0
        self.stopped = False
        self.view_cosine = torch.zeros(rows, device=device)

    def confident(self, cfg: TrainConfig, bank: torch.Tensor, sims=None, ids=None) -> tuple[torch.Tensor, float, float]:
        """(each row's confident neighbours, n x K ids, -1 unused; the share of rows with one; the
        cosine that makes one): mutual among their neighbour_k nearest rows and as close as two
        views of one image reach half the time."""
        if sims is None:
            sims, ids = neighbours.nearest_rows(bank, max(cfg.neighbour_k, 10))
        threshold = float(self.view_cosine.quantile(1 - cfg.neighbour_quantile))
        confident = neighbours.mutual_neighbourhoods(sims, ids, cfg.neighbour_k, threshold)
        return confident, float((confident >= 0).any(dim=1).float().mean()), threshold

    def views_share(self, cfg: TrainConfig, bank: torch.Tensor, paths: list[str] | None) -> tuple[float, float, float]:
        """The multi-view check's figures: (share of rows with a confident neighbour that is not a
        copy of the same picture, share with any confident neighbour, the cosine that makes one).
        Without files to compare (an embedded dataset) the two shares are the same."""
        confident, share, threshold = self.confident(cfg, bank)
        if paths is None or share == 0:
            return share, share, threshold
        return share * neighbours.beyond_copies(confident, paths, cfg.seed), share, threshold

    def round_due(self, cfg: TrainConfig, epoch: int, bank: torch.Tensor, tau: float) -> dict:
        """Run the round due before this epoch (neighbours.round_epochs): mine the bank's FAISS
        mirror, choose each row's positives by the rule, and refuse a round whose links would
        join over half the set (growth then stops, and the run says so). Returns the round's
        figures for the epoch's metrics row ({} when no round was due)."""
        if cfg.neighbourhoods == "off" or self.stopped:
            return {}
        due = sum(epoch >= e for e in neighbours.round_epochs(cfg.epochs, cfg.neighbour_rounds, cfg.neighbour_start))
        if self.rounds >= due:  # one round an epoch at most: rounds due together follow one another
            return {}
        t = time.perf_counter()
        self.rounds += 1
        share = neighbours.curriculum_share(self.rounds, cfg.neighbour_rounds)
        sims, ids = neighbours.nearest_rows(bank, max(cfg.neighbour_k, 10))
        _, grouped, threshold = self.confident(cfg, bank, sims, ids)
        if cfg.neighbourhoods == "anchors":
            found = neighbours.anchor_neighbourhoods(sims, ids, share, cfg.neighbour_k, tau)
        else:
            found = neighbours.mutual_neighbourhoods(sims, ids, cfg.neighbour_k, threshold, share)
        figures = neighbours.round_figures(found, self.neighbourhoods)
        refused = figures["neighbourhood_largest"] > neighbours.MAX_COMPONENT
        if refused:
            self.stopped = True
            log(
                f"note: neighbourhood round {self.rounds} would link {figures['neighbourhood_largest']:.0%} of "
                f"the images into one group; keeping the last round's neighbourhoods and growing no more"
            )
        else:
            self.neighbourhoods = found
        log(
            f"neighbourhood round {self.rounds}/{cfg.neighbour_rounds}: {figures['neighbourhood_rows']} of "
            f"{len(found)} images have neighbours, mean size {figures['neighbourhood_size']:.2f}, largest "
            f"group {figures['neighbourhood_largest']:.1%}, agreement {figures['neighbourhood_agreement']:.2f}"
            f"; {grouped:.0%} have a confident neighbour (cosine >= {threshold:.3f})"
        )
        return {
            "neighbourhood_round": self.rounds,
            "neighbourhood_share": share,
            "neighbourhood_threshold": threshold,
            "neighbourhood_confident": grouped,
            **figures,
            "neighbourhood_refused": refused,
            "neighbourhood_seconds": round(time.perf_counter() - t, 3),
        }

    def state(self) -> dict:
        """The checkpoint's keys for discovery (named as checkpoints have always named them)."""
        return {
            "neighbourhoods": self.neighbourhoods,
            "rounds": self.rounds,
            "rounds_stopped": self.stopped,
            "view_cosine": self.view_cosine,
        }

    def load_state(self, ckpt: dict) -> None:
        if "rounds" not in ckpt:  # checkpoints before neighbourhood discovery have none
            return
        found = ckpt["neighbourhoods"]
        self.neighbourhoods = None if found is None else found.to(self.view_cosine.device)
        self.rounds, self.stopped = ckpt["rounds"], ckpt["rounds_stopped"]
        self.view_cosine.copy_(ckpt["view_cosine"])
