"""tpx — the telemetry processor: Redis Stream → PostgreSQL `positions`, at least once."""

__version__ = "0.1.0"
