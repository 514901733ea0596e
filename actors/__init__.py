"""Entity deciders (pure) and the generic host that runs them over the log."""
