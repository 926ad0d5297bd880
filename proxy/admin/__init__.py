"""The admin HTTP API under the reserved prefix; may import every capability's public surface."""
