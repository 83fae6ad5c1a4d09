"""The sum a routing pass computes over the input capsules (routing/streaming.py's docstring):
the values of the pass kernels' ``MODE`` constexpr.

Kernels test ``MODE == modes.SUM`` and launchers pass ``MODE=modes.SUM``.  Kernels reach the
names through this module: triton 3.8 takes a global only as a ``tl.constexpr`` object (an int,
even annotated ``tl.constexpr``, is refused) and then compares every such global with its value
at compile time on every launch, about 1.4 us each on the host; a module attribute is neither
refused nor re-checked.  The values are part of the kernels' source: a kernel compiled with
another value is not recompiled, so clear the triton cache after changing one.
"""
SUM = 0       # sum_i u_ij: uniform couplings
FORWARD = 1   # sum_i (q_ij + bias_ij) u_ij
BACKWARD = 2  # sum_i ga_ij u_ij: the softmax's vector-Jacobian product
