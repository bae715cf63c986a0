"""The gate's judge: a small CNN that names the defect class of a patch's image, trained
here on an archive's real defect crops; its penultimate layer is the feature space KID
is measured in.

It reads the image channel only. Given the mask as well, a classifier learns the mask's
shape (a thin line: crack; a disc: pore) as the cheapest evidence of the class, and a
blank image under a defect-shaped mask is then "agreed with"; whether the mask fits the
image is the gate's contrast check (patches.mask_contrast)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class CropClassifier(nn.Module):
    """B x 1 x S x S float32 images in [-1, 1] (a patch's image channel, `images_of`)
    -> B x n_classes logits.

    Three conv blocks (16, 32, 64 channels, each halving the side), global average
    pooling to a 64-d feature (`features`), one linear head.
    """

    def __init__(self, n_classes: int, width: int = 16):
        super().__init__()
        layers, c = [], 1
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """B x 64 float32 penultimate features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def images_of(patches: np.ndarray) -> np.ndarray:
    """N x 2 x S x S (image, mask) patches -> N x 1 x S x S: what the classifier reads."""
    return np.asarray(patches, np.float32)[:, :1]


def train_crop_classifier(patches: np.ndarray, labels: np.ndarray, n_classes: int, *, epochs: int = 40,
                          min_steps: int = 100, batch_size: int = 64, lr: float = 3e-3,
                          seed: int = 0) -> CropClassifier:
    """Fit on N x 2 x S x S float32 (image, mask) patches in [-1, 1] (the image channel is
    read) and N int64 class labels; classes are weighted by inverse frequency (rare
    classes are the point), patches flipped at random. At least `min_steps` optimiser
    steps: the crops of a small archive fit in one batch, where `epochs` would be as few."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(images_of(patches), dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    counts = torch.bincount(y, minlength=n_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    model = CropClassifier(n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    model.train()
    per_epoch = max(1, sum(1 for i in range(0, len(x), batch_size) if len(x) - i >= 2))
    for _ in range(max(epochs, -(-min_steps // per_epoch))):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two rows
            xb = x[idx]
            if torch.rand((), generator=g) < 0.5:
                xb = xb.flip(-1)
            if torch.rand((), generator=g) < 0.5:
                xb = xb.flip(-2)
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: CropClassifier, patches: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(N x n_classes float32 probabilities, N x 64 float32 features) of N x 2 x S x S
    (image, mask) patches in [-1, 1], judged by their image channel."""
    images = images_of(patches)
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        xb = torch.as_tensor(images[i:i + batch_size], dtype=torch.float32)
        f = model.features(xb)
        probs.append(torch.softmax(model.head(f), dim=1).numpy())
        feats.append(f.numpy())
    if not probs:
        return np.zeros((0, model.head.out_features), np.float32), np.zeros((0, model.head.in_features), np.float32)
    return np.concatenate(probs), np.concatenate(feats)
