"""Moving KV blocks beyond the device pool: the offload tiers (host memory, disk)."""
