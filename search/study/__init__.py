"""The study: its configuration, pre-flight checks (no torch, no Ray), search space, GPU share, Tune wiring and driver."""
