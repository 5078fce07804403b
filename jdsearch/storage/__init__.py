"""The storage side of a study: the Optuna RDB storage wrapped for outages (``rdb``, ``reconnect``),
the SQL artifact store (``artifacts``), garbage collection of artifacts no study reads (``gc``)
and the one adapter that touches Optuna's internals (``optuna_internals``).

Imports the core and spec layers, optuna and sqlalchemy; never torch training, the search's own
modules, the report or the CLI.
"""
