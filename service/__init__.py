"""vitserve's serving side: bytes → preprocess → batcher → engines → top-k → HTTP / KServe v2 / gRPC responses."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vitserve")
except PackageNotFoundError:  # a Bento's src/ or a plain checkout: not installed as a distribution
    __version__ = "0.1.0"
