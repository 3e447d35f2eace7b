"""PyTorch definitions of the scan-path models. Small on purpose: they run per tile on a Jetson.

Both are plain conv/BN/ReLU stacks with global pooling: every op maps to
TensorRT and ONNX Runtime kernels without plugins, and BatchNorm folds into
the convolutions at export.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AutofocusNet(nn.Module):
    """Per crop (7 x 64 x 64): signed defocus (µm) and a content logit.

    Outputs ``defocus_um`` (N,) and ``content_logit`` (N,): the runtime takes the
    median defocus over the crops whose content probability exceeds 0.5. With
    ``magnitude``, a third output ``abs_defocus_um`` (N,): |defocus| learnt on objectives of
    every kind, including those whose sign no single frame tells (flipped, aberration-free).
    """

    def __init__(self, in_ch: int = 7, width: int = 16, magnitude: bool = False) -> None:
        super().__init__()
        self.magnitude = magnitude
        w = width
        self.features = nn.Sequential(
            _block(in_ch, w, 2),  # 32
            _block(w, 2 * w, 1),
            _block(2 * w, 2 * w, 2),  # 16
            _block(2 * w, 4 * w, 1),
            _block(4 * w, 4 * w, 2),  # 8
            _block(4 * w, 4 * w, 1),
            _block(4 * w, 4 * w, 2),  # 4
        )
        outputs = 3 if magnitude else 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, outputs)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.head(self.features(x))
        if self.magnitude:
            return y[:, 0], y[:, 1], y[:, 2]
        return y[:, 0], y[:, 1]


class TileClassifier(nn.Module):
    """Per window (3 x 64 x 64 at 1 µm/px): class logits (background, tissue, artifact) and a
    64-d L2-normalised embedding (for later issues: retrieval, QC, clustering)."""

    def __init__(self, classes: int = 3, width: int = 16, embed: int = 64) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 2),  # 32
            _block(w, 2 * w, 1),
            _block(2 * w, 2 * w, 2),  # 16
            _block(2 * w, 4 * w, 1),
            _block(4 * w, 4 * w, 2),  # 8
            _block(4 * w, 4 * w, 2),  # 4
        )
        self.embed = nn.Linear(4 * w * 2, embed)
        self.classify = nn.Linear(embed, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        # Mean and max pooling: a few dust specks or an ink edge are small; max keeps them.
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        e = torch.relu(self.embed(pooled))
        logits = self.classify(e)
        return logits, nn.functional.normalize(e, dim=1)


def count_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one sample (convolutions and linear layers)."""
    macs = 0

    def conv_hook(m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(m, nn.Conv2d)
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += int(out[0].numel()) * k

    def lin_hook(m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(m, nn.Linear)
        macs += m.in_features * m.out_features

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(lin_hook))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    model.train(was)
    for h in hooks:
        h.remove()
    return macs
