"""Meshes and the logical-axis rules table, the expert-parallel token exchange, and multi-host start-up."""
