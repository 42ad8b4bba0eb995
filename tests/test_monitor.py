import math

import torch
import torch.nn.functional as F

from instret.monitor import label_free_metrics


def test_views_that_are_the_clean_images_find_their_own_bank_rows():
    bank = F.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    ids = torch.tensor([3, 50, 199, 0, 120])
    m = label_free_metrics(bank[ids], bank[ids], ids, bank, chunk=2)
    assert m["instance_recall@1"] == 1.0
    assert m["alignment"] == 0.0


def test_recall_counts_the_views_whose_nearest_row_is_another_image():
    bank = torch.eye(4)
    ids = torch.arange(4)
    views = bank[[0, 1, 3, 3]]  # the third view looks like image 3, not its own image 2
    assert label_free_metrics(views, bank, ids, bank)["instance_recall@1"] == 0.75


def test_orthogonal_features_have_closed_form_uniformity_and_pair_cosine():
    clean = torch.eye(8)  # every pair at cosine 0, squared distance 2
    m = label_free_metrics(clean, clean, torch.arange(8), clean)
    assert abs(m["mean_pair_cosine"]) < 1e-7
    assert math.isclose(m["uniformity"], -4.0, abs_tol=1e-6)


def test_collapsed_features_show_as_pair_cosine_one_and_uniformity_zero():
    clean = F.normalize(torch.ones(6, 4), dim=1)
    views = F.normalize(torch.tensor([[1.0, 0, 0, 0]] * 6), dim=1)
    m = label_free_metrics(views, clean, torch.arange(6), clean)
    assert math.isclose(m["mean_pair_cosine"], 1.0, rel_tol=1e-6)
    assert math.isclose(m["uniformity"], 0.0, abs_tol=1e-6)
    assert math.isclose(m["alignment"], 2 - 2 * 0.5, rel_tol=1e-6)  # cos(view, clean) = 1/2
