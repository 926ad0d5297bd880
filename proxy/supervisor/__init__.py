"""``strangler serve``'s parent: it owns the listening sockets, forks and supervises the workers
(restarts with backoff, crash loops reported), re-reads and validates the configuration on SIGHUP or
``strangler reload`` and replaces the workers by a new generation on the same sockets; on SIGUSR2 or
``strangler upgrade`` it hands the sockets to a new parent (``upgrade.py``, ``handover.py``). May
import ``proxy.server`` and everything below it; the CLI reaches it through ``proxy.cli``'s lazy
commands."""
