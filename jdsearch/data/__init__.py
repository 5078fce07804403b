"""The data layer: COCO loading and validation, batching and dynamic resolution (``coco``), and
the deterministic synthetic data set (``synth``).

Imports the core and spec layers, torch and torchvision; never optuna, sqlalchemy or plotly.
"""
