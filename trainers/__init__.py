"""What runs on a worker: config, data, model, DeepSpeed config, loop, metrics, launch, export."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ferry")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
