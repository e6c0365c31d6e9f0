"""Live migration: a table-driven state machine, its journal, and the source and target drivers."""
