"""Data files shipped with the metric trainer (the embedded Omniglot subset)."""
