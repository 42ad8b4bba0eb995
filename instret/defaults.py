"""The defaults a command shares with the library, each stated once. The library's signatures
and the command line's options and help texts read them from here; a light module, so that
`--help` imports no torch (tests/test_defaults.py holds every command's help to the values
that run)."""

from __future__ import annotations

IMAGE_SIZE = 32  # training side in pixels: the built-in sets, and every folder on a CPU
PHOTO_IMAGE_SIZE = 64  # a folder of photos trained on a GPU
INDEX_TYPE = "Flat"  # exact inner-product search
INDEX_BATCH = 64  # images per decoded batch: small batches keep decoding and encoding overlapped
INDEX_WORKERS = 2  # decoding processes
INDEX_DEVICE = "auto"  # the GPU when there is one
NPROBE = 16  # IVF layouts: inverted lists visited per query
EF_SEARCH = 64  # HNSW layouts: candidate list length
QUERY_K = 10
QUERY_DEVICE = "cpu"  # one query encodes faster than a GPU starts
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit
DUPS_PRECISION = 0.99
DUPS_KEEP = "largest"
SERVE_HOST = "127.0.0.1"  # loopback: nobody else reaches the index and its images
SERVE_PORT = 8000
SERVE_WORKERS = 1
SERVE_MAX_UPLOAD_MB = 20.0
