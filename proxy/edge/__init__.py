"""Our own HTTP/1.1 edge on httptools (llhttp): the pooled upstream client (and, later, the server).

Imports nothing of ours above it. Knows nothing of routing, splits or Redis.
"""
