"""Request-level routing: which whole model answers a query."""
