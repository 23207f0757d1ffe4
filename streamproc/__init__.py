"""streamproc: a streaming privacy processor for Kafka.

The package is layered so each concern is easy to find and to change:

* :mod:`streamproc.crypto` -- the envelope wire format, the data-key cache and KMS providers;
* :mod:`streamproc.schema` -- schema sources, Confluent framing, field annotations and
  output-schema derivation;
* :mod:`streamproc.policy` and :mod:`streamproc.operators` -- policy as code and the
  transform operators it names;
* :mod:`streamproc.pipeline` -- the pure, batch-oriented core that compiles a plan per
  (schema, audience) and knows nothing of Kafka;
* :mod:`streamproc.runtime` -- the Kafka worker, which knows nothing of operators;
* :mod:`streamproc.cli` -- the command line.
"""

__version__ = "0.1.0"
