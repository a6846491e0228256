import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny tensors everywhere: one thread is faster than two and immune to a busy second core (OMP_NUM_THREADS wins).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or 1)


class TinyCNN(torch.nn.Module):
    """A small seeded classifier: conv -> BN -> pool -> linear head ``fc``."""

    def __init__(self, in_ch: int = 1, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_ch, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN()
