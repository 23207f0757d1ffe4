"""Build hook for the optional compiled plan interpreter (crate native/, PyO3).

Everything else about the package is in pyproject.toml.  The extension is optional: without
a Rust toolchain, or if its build fails, ``pip install -e .`` still succeeds and the
generated Python plan functions run instead (streamproc/pipeline/native.py).
"""

from setuptools import setup
from setuptools_rust import Binding, RustExtension

setup(
    rust_extensions=[
        RustExtension(
            "streamproc._native",
            path="native/Cargo.toml",
            binding=Binding.PyO3,
            optional=True,
            debug=False,  # editable installs would otherwise build unoptimized (about 5x slower)
            py_limited_api="auto",
        )
    ]
)
