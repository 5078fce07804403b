"""``jdsearch init``: writing a commented study spec for a COCO data set (``init_study``): the
resolution ladder, R_base, budgets and a teacher pool matched to the base, derived from the data
and the base checkpoint's metadata.

Imports the core, spec, data and store layers; never training, the search, optuna, sqlalchemy or
plotly.
"""
