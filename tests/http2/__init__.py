"""HTTP/2 on the listener: streams, flow control, drain, limits and the hostile suite."""
