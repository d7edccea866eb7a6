"""Model architectures; `registry` maps a file's architecture name to its class."""
