"""The demo: a sample tasks API as v1 and v2, and `strangler demo` running everything together."""
