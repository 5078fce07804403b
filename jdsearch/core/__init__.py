"""The core layer: exceptions (``errors``), the ``LONGxSHORT`` resolution (``resolution``), the one
config reader of every spec (``config``) and lazy package exports (``lazy``).

Imports nothing of jdsearch and no heavy package: never torch, torchvision, optuna, sqlalchemy,
plotly or onnx.
"""
