"""Library passes, one family per module. Each module registers its passes by name
with :func:`fxopt.registry.register_pass` when imported."""
