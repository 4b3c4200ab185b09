"""Tokenizer training losses beyond L1/L2: an LPIPS-style perceptual distance on VGG16 features and a
hinge PatchGAN discriminator with the VQGAN adaptive generator weight.

The perceptual loss needs pretrained weights, which elmgen never downloads: the user passes one file
holding torchvision's VGG16 `features.*` tensors and LPIPS's linear heads `lin0.model.1.weight` ..
`lin4.model.1.weight` (docs/tokenizers.md shows how to merge the two published files into it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from elmgen.errors import ElmgenError


@dataclass
class LossConfig:
    l1: float = 1.0  # weight of the mean absolute error
    l2: float = 1.0  # weight of the mean squared error
    perceptual: float = 1.0  # weight of the perceptual loss, when perceptual_weights is given
    perceptual_weights: str | None = None  # VGG16 + LPIPS weights file; None: no perceptual loss
    gan: bool = False  # train a hinge PatchGAN discriminator against the decoder
    gan_weight: float = 0.5  # generator loss weight, times the adaptive weight
    gan_start: int = 1000  # first step with the discriminator (reconstruction alone before)
    edge_weight: float = 0.0  # > 0: L1/L2 weigh pixels beside an edge of the original 1 + this (edge_weights)

    def validate(self) -> None:
        if min(self.l1, self.l2, self.perceptual, self.gan_weight, self.edge_weight) < 0 or self.gan_start < 0:
            raise ElmgenError("loss weights and loss.gan_start must be >= 0")


EDGE_RANGE = 8 / 127.5  # a pixel is beside an edge when its 3x3 neighbourhood spans more than 8 grey levels


def edge_weights(x_BCHW: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W) from the originals in [-1, 1]: 1 + `weight` on pixels within 1 px of an
    edge, 1 elsewhere, scaled to a mean of 1 over the batch. Where a reconstruction puts an outline is what a shape
    classifier judges it by, and those few pixels are a small share of a plain mean (docs/own-data.md)."""
    range_B1HW = (F.max_pool2d(x_BCHW, 3, 1, 1) + F.max_pool2d(-x_BCHW, 3, 1, 1)).amax(1, keepdim=True)
    w_B1HW = 1 + weight * (range_B1HW > EDGE_RANGE).float()
    return w_B1HW / w_B1HW.mean()


# torchvision's VGG16 `features`: 3x3 convs (+ ReLU) and 2x2 max-pools ("M"); module indices match its file.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # outputs of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS's input scaling: images in [-1, 1] to ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
            cin = item
    return nn.Sequential(*layers)  # ends at relu5_3, the last tap


class PerceptualLoss(nn.Module):
    """LPIPS-style distance: unit-normalised VGG16 features at five depths, squared differences weighted
    per channel by non-negative linear heads, averaged over space and summed over depths. Frozen."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_WIDTHS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None], persistent=False)
        self.requires_grad_(False)

    def _taps(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        h = (x_BCHW.expand(-1, 3, -1, -1) - self.shift) / self.scale  # grey images as RGB
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                taps.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) between images in [-1, 1]."""
        pairs = zip(self._taps(x_BCHW), self._taps(y_BCHW), strict=True)
        return sum(lin((a - b).pow(2)).mean((1, 2, 3)) for lin, (a, b) in zip(self.lins, pairs, strict=True))


def lpips_state_dict(model: PerceptualLoss) -> dict[str, torch.Tensor]:
    """The model's weights under the file's key names (the inverse of `load_perceptual`)."""
    state = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    state.update({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(model.lins)})
    return state


def load_perceptual(path: str | Path) -> PerceptualLoss:
    """The perceptual loss with weights from `path` (.safetensors or a torch state dict); ElmgenError if the
    file is missing, unreadable or not a VGG16 + LPIPS weights file."""
    path = Path(path)
    hint = "pass a file with VGG16 `features.*` and LPIPS `lin*.model.1.weight` tensors (see docs/tokenizers.md)"
    if not path.is_file():
        raise ElmgenError(f"perceptual weights file not found: {path}; {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # every reader failure means the same to the user: not a weights file
        raise ElmgenError(f"cannot read perceptual weights {path}: {str(e).splitlines()[0]}; {hint}") from None
    model = PerceptualLoss()
    wanted = lpips_state_dict(model)
    if not isinstance(state, dict):
        raise ElmgenError(f"{path} holds a {type(state).__name__}, not a state dict; {hint}")
    missing = [k for k in wanted if k not in state]
    wrong = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(wanted[k].shape)]
    if missing or wrong:
        raise ElmgenError(
            f"{path} is not a VGG16 + LPIPS weights file: missing {missing[:3]}, wrong shape {wrong[:3]}; {hint}"
        )
    with torch.no_grad():
        for k, v in wanted.items():
            v.copy_(state[k])
    return model.eval()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): 4x4 convs, `layers` of them downsampling, BatchNorm and LeakyReLU;
    one real/fake logit per overlapping patch."""

    def __init__(self, in_channels: int, width: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        cin = width
        for n in range(1, layers + 1):
            cout = width * min(2**n, 8)
            seq += [
                nn.Conv2d(cin, cout, 4, 2 if n < layers else 1, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2),
            ]
            cin = cout
        seq.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        self.layers = layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_image_size(self) -> int:
        """Smallest image side with at least one patch: `layers` halvings, then two 4x4 convs lose 1 each."""
        return 3 * 2**self.layers

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_BCHW)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def adaptive_weight(
    rec_loss: torch.Tensor, gen_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1.0
) -> torch.Tensor:
    """VQGAN's balance: |grad rec| / |grad gen| at the decoder's last layer, clamped to [0, max_weight]."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gen = torch.autograd.grad(gen_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gen.norm() + 1e-4)).clamp(0.0, max_weight).detach()
