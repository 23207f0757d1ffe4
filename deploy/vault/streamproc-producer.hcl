# OpenBao / Vault policy for producers that seal records into source topics.
#
# A producer needs fresh data keys under source KEKs and nothing more: it cannot decrypt
# what it (or anyone else) produced.  Narrow the glob to the producer's own topics where
# possible, e.g. "transit/datakey/plaintext/streamproc-src-orders".
#
# Apply:  bao policy write streamproc-producer deploy/vault/streamproc-producer.hcl

# Generate data keys under source KEKs (plaintext to encrypt with, wrapped to ship).
path "transit/datakey/plaintext/streamproc-src-*" {
  capabilities = ["update"]
}

# Deny beats any grant from another policy on the same token.
path "transit/decrypt/streamproc-src-*" {
  capabilities = ["deny"]
}
