"""Networks shared by decoders (here) and encoders (``pvae.guides``): MLPs and 28x28 conv stacks.

Every network takes inputs with any leading shape ``(..., in)`` so that the ELBO's vectorized
particles ``(K, B, D)`` pass through unchanged.
"""

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus}


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers through ``sizes`` with ``activation`` between them (none after the last)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def check_conv_shape(image_shape) -> None:
    if tuple(image_shape[1:]) != (28, 28):
        raise ValueError(f"the convolutional networks take 28x28 images, not {tuple(image_shape)}")


class ConvDecoder(nn.Module):
    """z (..., D) -> (..., k * C * 28 * 28): a linear layer to 64x7x7, then two stride-2 transposed convs."""

    def __init__(self, latent_dim: int, image_shape, params_per_pixel: int = 1):
        super().__init__()
        check_conv_shape(image_shape)
        self.out_channels = image_shape[0] * params_per_pixel
        self.fc = nn.Sequential(nn.Linear(latent_dim, 64 * 7 * 7), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # 14x14
            nn.ReLU(),
            nn.ConvTranspose2d(32, self.out_channels, 4, stride=2, padding=1),  # 28x28
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).view(-1, 64, 7, 7)
        return self.deconv(h).reshape(*batch_shape, -1)


class ConvEncoder(nn.Module):
    """x (..., C * 28 * 28) -> (..., 64 * 7 * 7) features: two stride-2 convs (an encoder's body; the
    guide adds the linear head sized to the model's latent sites)."""

    static_structure = True  # the same operations on every batch (pvae.protocols.StaticProgram)

    def __init__(self, image_shape):
        super().__init__()
        check_conv_shape(image_shape)
        self.image_shape = tuple(image_shape)
        self.conv = nn.Sequential(
            nn.Conv2d(image_shape[0], 32, 4, stride=2, padding=1),  # 14x14
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),  # 7x7
            nn.ReLU(),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_shape = x.shape[:-1]
        return self.conv(x.reshape(-1, *self.image_shape)).reshape(*batch_shape, -1)
