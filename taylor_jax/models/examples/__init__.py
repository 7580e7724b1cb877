"""Example models written the way plain Flax users write them (no taylor_jax imports), used to
check that the library prunes unchanged user code (see :mod:`taylor_jax.resize`).

Import the modules you need: ``from taylor_jax.models.examples import mobilenet_v2``.
"""
