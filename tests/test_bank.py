import torch

from instret.bank import MemoryBank


def test_init_rows_are_unit_norm_and_seeded():
    a = MemoryBank(100, 16, generator=torch.Generator().manual_seed(1))
    b = MemoryBank(100, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a.features.norm(dim=1), torch.ones(100), atol=1e-6)
    assert torch.equal(a.features, b.features)


def test_update_touches_only_given_rows_and_matches_formula():
    bank = MemoryBank(20, 8, generator=torch.Generator().manual_seed(2))
    before = bank.features.clone()
    idx = torch.tensor([3, 7, 11])
    f = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    bank.update(idx, f, momentum=0.5)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(bank.features[untouched], before[untouched])
    for row, i in enumerate(idx.tolist()):
        mixed = 0.5 * before[i] + 0.5 * f[row]
        assert torch.allclose(bank.features[i], mixed / mixed.norm(), atol=1e-6)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(20), atol=1e-6)


def test_update_after_each_step_state():
    bank = MemoryBank(10, 4, generator=torch.Generator().manual_seed(3))
    for step in range(5):
        before = bank.features.clone()
        idx = torch.tensor([step, step + 5])
        bank.update(idx, torch.nn.functional.normalize(torch.randn(2, 4), dim=1), momentum=0.9)
        changed = (bank.features != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == idx.tolist()


def test_update_keeps_no_graph():
    bank = MemoryBank(5, 4)
    f = torch.randn(2, 4, requires_grad=True)
    bank.update(torch.tensor([0, 1]), f * 2, momentum=0.5)
    assert not bank.features.requires_grad and bank.features.grad_fn is None


def test_momentum_zero_copies_normalised_features():
    bank = MemoryBank(6, 3)
    f = torch.tensor([[3.0, 0.0, 4.0]])
    bank.update(torch.tensor([2]), f, momentum=0.0)
    assert torch.allclose(bank.features[2], torch.tensor([0.6, 0.0, 0.8]))
