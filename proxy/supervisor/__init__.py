"""The parent process: owns the listening sockets, supervises generations of workers, hands the
sockets to a new generation on upgrade (handover.py: standard library only)."""
