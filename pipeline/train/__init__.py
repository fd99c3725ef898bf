"""The trainer of the ``sft`` and ``train`` stages: one loop (``loop``) and each concern beside it.

See docs/architecture.md for what lives where."""
