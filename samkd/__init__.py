"""samkd: distil Segment Anything teachers into MobileSAM and fine-tune it on your own data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("samkd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
