"""Between the HTTP workers and the engine processes: jobs, the wire format, heartbeats,
and a worker's connections to the engines (no torch, no Flask)."""
