"""Datasets (QM9, XYZ), the featurized-data cache and static-shape batching."""

from mpattn.data.graphset import GraphSet

__all__ = ["GraphSet"]
