"""Integrations of the streamproc client SDK with other stream-processing tools.

* :mod:`streamproc.integrations.faust` -- Faust (``faust-streaming``) schemas, codecs and
  a topic class that seal records for producers and open sanitized records for
  subscribers.  Needs the optional extra: ``pip install 'streamproc[faust]'``.
* :class:`ScopedKms` -- a KMS view limited to a few KEKs, so a subscriber sharing a
  development keyring holds only its audience's key, as a Vault policy or an IAM policy
  would enforce in production.

This package imports no optional dependency itself: ``import streamproc.integrations``
works without Faust installed, and only ``streamproc.integrations.faust`` needs it.
For confluent-kafka, see :mod:`streamproc.client.kafka`; ``docs/integrations.md`` covers
all of them, plus kcat for inspecting dead letters and the provenance header.
"""

from streamproc.integrations.scoped import ScopedKms

__all__ = ["ScopedKms"]
