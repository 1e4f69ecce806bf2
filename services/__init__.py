"""Everything that serves: the Ray Serve app, request/response schemas, metrics."""
