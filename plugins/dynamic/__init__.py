"""Dynamic, per-prompt reduction: probes, sparse recovery, and decoding with a per-prompt choice."""
