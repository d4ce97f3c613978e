"""ctrstream stream side: events, sequence stores, the stream worker."""
