import torch
import torch.nn.functional as F

from instret.knn import FeatureIndex, drop_self, knn_evaluate, knn_vote, torch_search


def brute_force_predict(queries, keys, key_labels, num_classes, k, sigma, exclude_self=False):
    """Per query: sort all similarities, take the k best (skipping itself), sum exp(s/sigma) per class."""
    preds = []
    for qi, q in enumerate(queries):
        sims = [(float(q @ keys[j]), j) for j in range(len(keys)) if not (exclude_self and j == qi)]
        sims.sort(key=lambda t: -t[0])
        score = [0.0] * num_classes
        for s, j in sims[:k]:
            score[int(key_labels[j])] += torch.exp(torch.tensor(s / sigma, dtype=torch.float64)).item()
        preds.append(max(range(num_classes), key=lambda c: score[c]))
    return torch.tensor(preds)


def clustered(n, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centres[labels] + 1.5 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1), labels


def test_faiss_knn_predictions_equal_brute_force():
    keys, key_labels = clustered(300, 16, 5, seed=0)
    queries, query_labels = clustered(60, 16, 5, seed=1)
    index = FeatureIndex()
    index.sync(keys)
    sims, ids = index.search(queries, 20)
    fast = knn_vote(sims, key_labels[ids], 5, sigma=0.1).argmax(dim=1)
    slow = brute_force_predict(queries, keys, key_labels, 5, 20, 0.1)
    assert torch.equal(fast, slow)
    acc = knn_evaluate(index, key_labels, queries, query_labels, 5, k=20, sigma=0.1)
    assert abs(acc["knn_top1"] - float((slow == query_labels).float().mean())) < 1e-6


def test_faiss_topk_equals_torch_topk():
    keys, _ = clustered(500, 32, 4, seed=2)
    queries, _ = clustered(50, 32, 4, seed=3)
    index = FeatureIndex()
    index.sync(keys)
    s1, i1 = index.search(queries, 10)
    s2, i2 = torch_search(queries, keys, 10)
    assert torch.allclose(s1, s2, atol=1e-5)
    assert (i1 == i2).float().mean() > 0.99  # ties aside


def test_leave_one_out_equals_brute_force_excluding_self():
    keys, labels = clustered(200, 8, 3, seed=4)
    index = FeatureIndex()
    index.sync(keys)
    slow = brute_force_predict(keys, keys, labels, 3, 15, 0.1, exclude_self=True)
    acc = knn_evaluate(index, labels, keys, labels, 3, k=15, sigma=0.1, leave_one_out=True)
    assert abs(acc["knn_top1"] - float((slow == labels).float().mean())) < 1e-6


def test_class_pure_features_give_full_accuracy():
    labels = torch.arange(10).repeat(30)
    keys = F.one_hot(labels, 10).float()
    index = FeatureIndex()
    index.sync(keys)
    acc = knn_evaluate(index, labels, keys, labels, 10, k=200, sigma=0.1)
    assert acc == {"knn_top1": 1.0, "knn_top5": 1.0}


def test_vote_closed_form():
    sims = torch.tensor([[0.5, 0.2, 0.1]])
    labels = torch.tensor([[1, 0, 1]])
    scores = knn_vote(sims, labels, 3, sigma=0.1)
    e = torch.exp(torch.tensor([5.0, 2.0, 1.0]))
    assert torch.allclose(scores, torch.tensor([[e[1], e[0] + e[2], 0.0]]))


def test_drop_self_removes_query_or_last():
    sims = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]])
    ids = torch.tensor([[4, 0, 2], [5, 6, 7]])
    s, i = drop_self(sims, ids, torch.tensor([0, 1]))
    assert i.tolist() == [[4, 2], [5, 6]]
    assert torch.allclose(s, torch.tensor([[0.9, 0.7], [0.9, 0.8]]))


def test_a_bank_on_the_gpu_is_searched_where_it_lies(monkeypatch):
    """faiss-gpu seeing a GPU, faked: FAISS's GPU brute force gets the bank tensor itself (no
    copy through the host), one GPU resources object for every search, and the torch search
    answers beyond FAISS's k limit or without faiss-gpu. The bank stands on the CPU here."""
    import faiss
    import faiss.contrib.torch_utils  # what instret imports first, imported here first

    from instret import faiss_boundary
    from instret import knn as knn_module

    calls = []

    def fake_knn_gpu(res, xq, xb, k, metric=None, device=-1):
        calls.append(dict(res=res, xq=xq, xb=xb, k=k, metric=metric, device=device))
        return torch_search(xq, xb, k)

    monkeypatch.setattr(faiss, "knn_gpu", fake_knn_gpu, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(knn_module, "faiss_gpu_count", lambda: 1)
    faiss_boundary.gpu_resources.cache_clear()
    try:
        g = torch.Generator().manual_seed(0)
        bank = F.normalize(torch.randn(300, 16, generator=g), dim=1)
        queries = F.normalize(torch.randn(20, 16, generator=g), dim=1)
        index = FeatureIndex()
        index.sync(bank, in_place=True)
        sims, ids = index.search(queries, 10)
        assert index.engine == "faiss-gpu" and len(calls) == 1
        call = calls[0]
        assert call["xb"].data_ptr() == bank.data_ptr() and call["k"] == 10  # the bank itself
        assert call["metric"] == faiss.METRIC_INNER_PRODUCT and call["device"] == 0
        assert torch.equal(ids, torch_search(queries, bank, 10)[1])
        index.search(queries, 5)
        assert calls[1]["res"] is call["res"]  # one resources object per GPU and process
        big = F.normalize(torch.randn(3000, 16, generator=g), dim=1)
        index.sync(big, in_place=True)
        _, ids = index.search(queries, 2100)  # above FAISS GPU's 2,048
        assert index.engine == "torch" and len(calls) == 2 and ids.shape == (20, 2100)
        monkeypatch.setattr(knn_module, "faiss_gpu_count", lambda: 0)  # faiss-cpu on a GPU machine
        index.sync(big, in_place=True)
        index.search(queries, 5)
        assert index.engine == "torch" and len(calls) == 2
    finally:
        faiss_boundary.gpu_resources.cache_clear()
