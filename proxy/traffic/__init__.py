"""The hot path: routing, split, deprecation, forwarding. Imports settings, metrics, control; never
canary/, shadow/ or admin/ (those plug in through the small protocols in ``hooks``)."""
