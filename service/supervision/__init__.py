"""Supervision of serve's processes: the supervisor, its engine children and their
restarts, what the idle processes hold, the checks before anything starts, the
engines' memory allocator. No torch, no Flask."""
