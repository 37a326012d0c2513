"""Moved to :mod:`segany.datasets.sa1b`."""

from ..datasets.sa1b import read_sa1b, to_sa1b, write_sa1b

__all__ = ["read_sa1b", "to_sa1b", "write_sa1b"]
