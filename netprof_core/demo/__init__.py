"""``netprof demo``: a small shop served by uvicorn with netprof's middleware,
its own netprofd, and traffic through normal, slow and failing phases."""
