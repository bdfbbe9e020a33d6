"""``torch.library`` custom ops (namespace ``fxopt``) that rewritten graphs call.

Each op has a fake implementation so a rewritten graph can still be exported or
compiled, a CPU implementation that is the plain-PyTorch reference, and a CUDA
implementation from :mod:`fxopt.codegen` (ops import codegen; codegen never imports ops).
Each op also has a graph entry point, the Python function rewritten graphs call
(``fused_add.fused_add_tree``, ``scan.selective_scan``, ``scan.linear_scan``): it skips
the dispatcher when no gradient can flow and nothing traces the call
(:func:`fxopt.ops.ad_support.direct_call_ok`), and calls the op otherwise.

Each op also carries reverse-mode autograd (``torch.library.register_autograd``), so a
model optimized with fxopt trains: ``fused_add.tree_vjp`` for the add trees,
:mod:`fxopt.ops.scan_grad` (checkpointed recompute of :mod:`fxopt.codegen.scan_ref`) for the
scans. What is refused, with a clear error instead of a silent zero, is in
:mod:`fxopt.ops.ad_support`: forward mode, and double backward through the scans."""
