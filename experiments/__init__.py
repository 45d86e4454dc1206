"""Experiments: thin command-line programs over the mpattn library."""
