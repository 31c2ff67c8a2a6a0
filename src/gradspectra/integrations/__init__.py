"""Front doors for training frameworks other than Lightning (each an optional extra)."""
