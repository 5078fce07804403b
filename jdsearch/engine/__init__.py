"""The engine layer: the training loop (``train``; data-parallel under ``torchrun`` through
``distributed``), COCO AP per size (``evaluate``), batch-1 latency (``latency``) and how many
torch threads a job uses (``threads``).

Imports the layers below (core, spec, data, models, store); never optuna, sqlalchemy or plotly.
"""
