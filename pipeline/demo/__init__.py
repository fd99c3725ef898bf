"""The built-in demo: its world (tiny teacher and student, the arithmetic task), ``lopd demo`` and ``lopd ablate``."""
