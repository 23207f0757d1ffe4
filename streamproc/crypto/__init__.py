"""Crypto layer: the envelope wire format, the data-key cache and KMS providers."""
