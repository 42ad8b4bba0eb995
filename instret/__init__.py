"""instret: Instance Discrimination (Wu et al., CVPR 2018) and instance-level image search.

The library reads like the command line (docs/training.md: "From Python"):

    import instret
    instret.train({"data": "photos/", "time_budget": 15, "out": "runs/photos"})
    instret.build_index("photos/", "runs/photos", "photos.index")
    hits = instret.search("photos.index", ["query.jpg"], k=5)
    groups = instret.find_duplicates("photos.index")["groups"]
    vectors = instret.load_encoder("runs/photos").embed([pil_image, "a.jpg", tensor])

Names are loaded on first use, so `import instret` does not import torch.
"""

from importlib import import_module

from instret.errors import InstretError

# public name -> (module, name in it)
_EXPORTS = {
    "TrainConfig": ("instret.config", "TrainConfig"),
    "load_encoder": ("instret.encoder", "load_encoder"),
    "build_index": ("instret.indexer", "build_index"),
    "Searcher": ("instret.searcher", "Searcher"),
    "search": ("instret.searcher", "query"),
    "find_duplicates": ("instret.duplicates", "find_duplicates"),
}


def train(options, resume: bool = False) -> dict:
    """Train or resume a run from a dict of TrainConfig options (see instret.run.train)."""
    from instret.run import train as run

    return run(options, resume=resume)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'instret' has no attribute {name!r}")


__all__ = ["InstretError", "train", *_EXPORTS]
