"""HTTP routers: thin, one per endpoint family."""
