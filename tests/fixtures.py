"""Shared test fixtures (factories); subpackage fixtures live beside their tests."""
