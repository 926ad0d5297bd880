"""Our own HTTP edge: the HTTP/1.1 server and pooled upstream client on httptools (llhttp), and
HTTP/2 on the listener over the ``h2`` library (``h2server``, ``h2guard``).

Imports nothing of ours above it. Knows nothing of routing, splits or Redis.
"""
