"""``torch.library`` custom ops (namespace ``fxopt``) that rewritten graphs call.

Each op has a fake implementation so a rewritten graph can still be exported or
compiled, a CPU implementation that is the plain-PyTorch reference, and a CUDA
implementation from :mod:`fxopt.codegen`."""
