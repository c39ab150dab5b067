"""Builds rlnorm's optional native CPU kernels; all other metadata lives in pyproject.toml.

The extension is optional: when no C compiler is available the build goes on without it and
rlnorm runs its pure-torch code path (same results, slower on the CPU).
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args = ["/O2", "/fp:precise"]
    link_args: list[str] = []
else:
    # No fused multiply-adds: the kernels must round exactly like the torch formulas.
    compile_args = ["-O3", "-ffp-contract=off", "-pthread"]
    link_args = ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "rlnorm.backends._kernels",
            sources=["src/rlnorm/backends/_kernels.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ]
)
