"""The smallest use: add the callback to a Trainer. Run: python examples/minimal.py"""

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset

from gradspectra import GradientSpectrumMonitor

monitor = GradientSpectrumMonitor(warmup_steps=5)
trainer = pl.Trainer(max_steps=20, callbacks=[monitor], default_root_dir="gradspectra_runs/minimal")
trainer.fit(BoringModel(), torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=4))
print(monitor.batch_records[-1]["metrics"])
