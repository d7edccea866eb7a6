"""The engine: request lifecycle from prompt to output."""
