# OpenBao / Vault policy for incident response: open dead letters, nothing else.
#
# `streamproc dlq inspect` and `streamproc dlq replay` unwrap the data keys of dead
# letters, which the processor sealed under the quarantine KEK (config dead_letter.kek,
# here streamproc-quarantine).  The original record inside stays sealed under its source
# KEK when it was an envelope: replay re-produces those bytes unchanged, so this role
# needs no source or audience key.  Both commands write an audit event per use.
#
# Apply:  bao policy write streamproc-incident-response deploy/vault/streamproc-incident-response.hcl
#         bao token create -policy=streamproc-incident-response -ttl=1h   (short-lived, per incident)

path "transit/decrypt/streamproc-quarantine" {
  capabilities = ["update"]
}

# It can open dead letters; it cannot seal new ones (no forged dead letters to replay).
path "transit/datakey/plaintext/streamproc-quarantine" {
  capabilities = ["deny"]
}
