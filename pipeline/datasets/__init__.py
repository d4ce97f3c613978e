"""Event sources: each turns a dataset into events in event-time order (DESIGN.md §3 contract)."""
