"""Control state held in Redis and its in-memory snapshot; imports only settings and metrics."""
