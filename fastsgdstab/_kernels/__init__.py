"""Compiled (Numba) kernels. Every ``@njit`` function of the package lives here and only here.

Kernels take arrays and scalars only; every check and allocation happens in the public layer.
"""
