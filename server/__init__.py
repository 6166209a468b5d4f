"""frankly server: settings, HTTP API, engine, hooks, metrics, web page."""

__version__ = "0.1.0"
