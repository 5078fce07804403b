"""The spec layer, torch-free: backbone encodings (``arch``), detector specs (``detector``), the
training and distillation settings (``settings``), the study spec (``study``), the synthetic
data set's (``synth``) and the teacher pool's spec and sub-network space (``pool``,
``pool_space``). A study file is read and validated
here in a fraction of a second, before anything heavy starts.

Imports the core layer only; never torch, torchvision, optuna, sqlalchemy, plotly or onnx.
"""
