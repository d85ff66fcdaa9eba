"""The study: its configuration, pre-flight checks (no torch, no Ray), space, GPU share, Tune wiring and driver."""
