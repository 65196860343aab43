"""Sharding: meshes, logical-axis rules, shardings, multi-host start-up."""
