"""Schema layer: Avro type model, Confluent framing, schema sources and annotations."""
