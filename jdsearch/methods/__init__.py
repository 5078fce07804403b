"""The paper's three mechanisms: distillation (``distill``), student morphism (``morph``) and the
elastic teacher pool's runtime (``pool``: the super-net, BN recalibration, integrated progressive
shrinking, pool files).

Imports the layers below (core, spec, data, models, store, engine); never optuna, sqlalchemy,
plotly or the search.
"""
