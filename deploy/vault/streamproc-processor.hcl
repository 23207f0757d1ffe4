# OpenBao / Vault policy for the streamproc processor (least privilege).
#
# The processor opens records sealed by producers (unwrap under SOURCE KEKs) and re-seals
# them per audience (new data keys under DESTINATION KEKs).  It must never be able to
# decrypt what it produced for an audience, and it needs nothing else on the data path.
#
# Conventions this file assumes (edit the paths if yours differ):
#   transit engine at  transit/   (VaultTransitKms mount=..., default "transit")
#   KV v2 engine at    secret/    (VaultTransitKms kv_mount=..., default "secret")
#   source KEKs        streamproc-src-<topic>      e.g. streamproc-src-orders
#   destination KEKs   streamproc-dst-<audience>   e.g. streamproc-dst-analytics
#   quarantine KEK     streamproc-quarantine       (config dead_letter.kek; dead letters)
#   subject-key KEKs   streamproc-subject-<audience> (config erasure.keks; erasable rules)
#   pseudonym secrets  secret/streamproc/<key_id>  (field "material", base64)
# To list keys explicitly instead of by prefix, repeat a stanza per exact key name.
#
# Apply:  bao policy write streamproc-processor deploy/vault/streamproc-processor.hcl
#         bao token create -policy=streamproc-processor -period=24h
# (tests/integration/test_kms_vault.py loads this very file and checks every rule.)

# Unwrap data keys that producers wrapped under source KEKs.
path "transit/decrypt/streamproc-src-*" {
  capabilities = ["update"]
}

# Read source key configuration (never material): min_decryption_version, soft-delete and
# existence, so cached data keys are evicted soon after a revocation.
path "transit/keys/streamproc-src-*" {
  capabilities = ["read"]
}

# Generate data keys under destination KEKs: the plaintext to encrypt with, the wrapped
# form to ship.  No decrypt, no "wrapped"-only variant, no encrypt of arbitrary data.
path "transit/datakey/plaintext/streamproc-dst-*" {
  capabilities = ["update"]
}

# Belt and braces: deny beats any grant, so even if another policy attached to the same
# token allowed it, this token cannot decrypt audience data.
path "transit/decrypt/streamproc-dst-*" {
  capabilities = ["deny"]
}

# Dead letters: seal (new data keys) under the quarantine KEK, never open them -- only
# the incident-response role can (streamproc-incident-response.hcl).
path "transit/datakey/plaintext/streamproc-quarantine" {
  capabilities = ["update"]
}
path "transit/decrypt/streamproc-quarantine" {
  capabilities = ["deny"]
}

# Only with context_binding = "derived" (servers older than Vault 1.13): the provider
# reads the destination key config to check the key is derived.  Not needed otherwise.
# path "transit/keys/streamproc-dst-*" {
#   capabilities = ["read"]
# }

# Pseudonym master secrets (KV v2 data path; read only, current and older versions).
path "secret/data/streamproc/*" {
  capabilities = ["read"]
}

# Subject-key KEKs (erasure.keks; one per audience with erasable rules, named
# streamproc-subject-<audience>): the processor seals the per-subject keys it creates
# (data keys) and opens them again after a restart (decrypt).  They are never destination
# KEKs, so this grants nothing on what the processor sealed for an audience.
path "transit/datakey/plaintext/streamproc-subject-*" {
  capabilities = ["update"]
}
path "transit/decrypt/streamproc-subject-*" {
  capabilities = ["update"]
}
