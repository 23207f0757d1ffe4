"""The ``streamproc`` command line (one module per command group)."""
