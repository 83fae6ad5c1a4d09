"""Routing kernels: the streaming machinery every algorithm shares (streaming.py: passes, final
gradient, launch plan, autotune lists and spill tables; tiles.py: the one-D-vector-per-thread
tile; modes.py: the sums a pass computes; compile_cases.py: building blocks of the compile-check
cases), then one module per algorithm (its pass kernel's finish, its launchers and its compile
cases) and couplings.py (the couplings of a routing state, for analysis)."""
