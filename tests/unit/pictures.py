"""What a test can check of a picture a command drew: that it is a PNG of the size the code asked
matplotlib for, and that something is drawn on it (not one blank colour)."""

from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_picture(path: Path, size: tuple[int, int] | None = None, min_size: tuple[int, int] = (300, 200),
                   min_drawn: float = 0.01, min_colours: int = 3) -> np.ndarray:
    """Check the PNG at `path` and return its pixels (height x width x channels, floats in [0, 1]).

    size: (width, height) in pixels, exactly (figsize x dpi where the code sets both); else at least
    min_size. Drawn: at least `min_drawn` of the pixels differ from the most common colour (the
    background), in at least `min_colours` distinct colours (axes, text and data)."""
    import matplotlib.image

    path = Path(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    if size is not None:
        assert (width, height) == size, f"{path}: {width} x {height} pixels, expected {size[0]} x {size[1]}"
    else:
        assert width >= min_size[0] and height >= min_size[1], f"{path}: only {width} x {height} pixels"
    rgb = (pixels[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    colours, counts = np.unique(rgb, axis=0, return_counts=True)
    drawn = 1 - counts.max() / counts.sum()
    assert drawn >= min_drawn, f"{path} is blank: {drawn:.2%} of its pixels differ from the background"
    assert len(colours) >= min_colours, f"{path} has only {len(colours)} colours"
    return pixels
