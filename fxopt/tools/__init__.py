"""Offline tools for fxopt's kernels (no part of the runtime: nothing in fxopt imports them).

* :mod:`fxopt.tools.sass` - compile the Gluon selective-scan kernel for a GPU architecture
  without a GPU (Triton ships ptxas) and read its SASS: registers, spills in the time loop,
  instructions per loop.
"""
