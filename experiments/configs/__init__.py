"""Presets of the experiments: named settings on top of the library's defaults.

The library's class defaults (``TrainConfig()``, ``create_model("attention")``) are the main
job's settings; a preset says only what differs, and why (``qm9.PRESETS``,
``ethanol.PRESET``).
"""
