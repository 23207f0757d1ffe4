# OpenBao / Vault policy for one audience's subscriber: here the "analytics" audience.
#
# Copy per audience, replacing "analytics".  A subscriber opens only what the processor
# sealed for its audience: decrypt on that one destination KEK, nothing else.  Exact key
# names on purpose -- a prefix glob such as streamproc-dst-analytics* would also match
# streamproc-dst-analytics-eu.
#
# Apply:  bao policy write streamproc-subscriber-analytics deploy/vault/streamproc-subscriber-analytics.hcl

# Unwrap data keys of envelopes sealed for this audience.
path "transit/decrypt/streamproc-dst-analytics" {
  capabilities = ["update"]
}

# Read the key configuration (never material) to notice revocations promptly.
path "transit/keys/streamproc-dst-analytics" {
  capabilities = ["read"]
}
