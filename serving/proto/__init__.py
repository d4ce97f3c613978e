"""Generated gRPC stubs of ``scorer.proto`` (regenerate with ``make protos``; do not edit)."""
