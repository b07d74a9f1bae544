"""Latent shapes (per sample, without the batch) the op benchmarks run at."""

import torch

# name -> latent shape at the model's real resolution (VAE stride 8 spatially, 4 temporally for Wan)
GPU_SIZES = {
    "sd35m_512": (16, 64, 64),            # SD3.5-Medium, 512 x 512
    "flux_720": (16, 90, 90),             # FLUX.1, 720 x 720
    "wan_240p_33f": (16, 9, 30, 52),      # Wan2.1, 240 x 416 x 33 frames
    "wan_480p_81f": (16, 21, 60, 104),    # Wan2.1, 480 x 832 x 81 frames (2.1M elements)
}

# the same aspect ratios at about 1/16 of the elements, so a 2-core CPU finishes in minutes
CPU_SIZES = {
    "sd35m_512": (16, 16, 16),
    "flux_720": (16, 22, 22),
    "wan_240p_33f": (16, 3, 8, 13),
    "wan_480p_81f": (16, 6, 15, 26),
}

BATCHES = (1, 4)


def sizes() -> dict[str, tuple[int, ...]]:
    return GPU_SIZES if torch.cuda.is_available() else CPU_SIZES
