"""`instret export`: the encoder as one file other programs run without instret, TorchScript or
ONNX, with its preprocessing written into the file.

The exported graph takes what a decoder gives: uint8 RGB images, N x 3 x S x S, already
resized and cropped the way instret reads a file; it does the rest (scaling to [0, 1],
normalisation) and returns the L2-normalised features, N x low_dim. The steps before it are
stated in the file's metadata (`instret.json` among TorchScript's extra files; ONNX
metadata_props), so a user of the file needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from instret.borders import MAX_SIDE, TOLERANCE
from instret.colour import with_colour
from instret.encoder import load_encoder
from instret.errors import InstretError
from instret.storage import atomic_write_bytes

FORMATS = ("torchscript", "onnx")


class WithPreprocessing(nn.Module):
    """uint8 images -> [0, 1] -> normalised -> encoder -> L2-normalised features (joined with
    the images' colour signature for an encoder trained for several views)."""

    def __init__(self, model: nn.Module, mean, std, colour_weight: float = 0.0):
        super().__init__()
        self.model, self.colour_weight = model, colour_weight
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model((images.float() / 255 - self.mean) / self.std)
        return with_colour(features, images, self.colour_weight) if self.colour_weight else features


def metadata(enc, fmt: str) -> dict:
    size = enc.image_size
    return {
        "producer": "instret",
        "format": fmt,
        "arch": enc.model.arch,
        "low_dim": enc.dim,
        "image_size": size,
        "encoder_fingerprint": enc.fingerprint,
        "mean": list(enc.mean),
        "std": list(enc.std),
        "input": f"uint8 RGB, N x 3 x {size} x {size}",
        "output": f"float32 features, N x {enc.dim}, L2-normalised (cosine = dot product)",
        "preprocessing": [
            "decode to RGB (EXIF orientation applied, transparency on white)",
            f"trim flat borders: edge lines within {TOLERANCE} levels of the outermost line's colour, "
            f"at most {MAX_SIDE:.0%} of a side per edge (instret.borders)",
            f"resize the shorter side to {size} px (bilinear), centre-crop {size} x {size}",
            "in the graph: divide by 255, subtract mean, divide by std (per channel, as given)",
        ]
        + (
            [f"in the graph: the colour signature joined at weight {enc.colour_weight:g} (instret.colour)"]
            if enc.colour_weight
            else []
        ),
    }


def export_encoder(model_path: str | Path, fmt: str, out: str | Path) -> dict:
    """Write the encoder of a run folder (or an encoder.pt) to `out` in `fmt`; returns the metadata."""
    if fmt not in FORMATS:
        raise InstretError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    enc = load_encoder(model_path)
    wrapped = WithPreprocessing(enc.model, enc.mean, enc.std, enc.colour_weight).eval().requires_grad_(False)
    example = torch.zeros(2, 3, enc.image_size, enc.image_size, dtype=torch.uint8)
    meta = metadata(enc, fmt)
    out = Path(out)
    with torch.no_grad():
        data = _torchscript(wrapped, example, meta) if fmt == "torchscript" else _onnx(wrapped, example, meta)
    atomic_write_bytes(out, data)
    return meta


def _torchscript(wrapped: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(wrapped, example), buf, _extra_files={"instret.json": json.dumps(meta)})
    return buf.getvalue()


def _onnx(wrapped: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    import io

    try:
        import onnx
    except ImportError:
        raise InstretError("--format onnx needs the onnx package: pip install onnx") from None
    buf = io.BytesIO()
    torch.onnx.export(
        wrapped,
        (example,),
        buf,
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        dynamo=False,
    )
    model = onnx.load_from_string(buf.getvalue())
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    return model.SerializeToString()
