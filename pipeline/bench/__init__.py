"""Benchmarks that print JSON: the stages (``lopd bench extract|train|data-stall``) and the trainer's memory model at
scale (``lopd bench train-memory``)."""
