"""How `prepare` stores one image, in a tree copy and in a pack alike, so that both hold the same
pixels: kept byte for byte where that serves (JPEG or PNG, no resize asked or already small
enough), else decoded and re-encoded (resized to the shorter side when asked)."""
from __future__ import annotations

import io

from PIL import Image

from .folder import to_rgb

KEEP_FORMATS = ("JPEG", "PNG")      # formats every loader (PIL, DALI) reads as they are


def for_copy(src: str, side: int | None) -> tuple[Image.Image | None, str, tuple[int, int]]:
    """(the image to re-encode, or None to keep the file as it is; its format; (height, width) of
    what is stored). Every byte is decoded (at a reduced JPEG scale where that is exact enough),
    so a truncated file raises here, as in the file index."""
    with Image.open(src) as img:
        width, height = img.size
        fmt = img.format
        scale = side / min(width, height) if side else 1.0
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if scale < 1:
            img.draft("RGB", size)                              # JPEG: decode at the DCT scale just above
        elif fmt == "JPEG":
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))   # only checked, kept as it is
        img.load()
        if width < 1 or height < 1:
            raise ValueError("empty image")
        if scale >= 1 and fmt in KEEP_FORMATS:
            return None, fmt, (height, width)
        out = to_rgb(img)
    if scale < 1:
        out = out.resize(size, Image.BICUBIC)
    return out, fmt, (out.size[1], out.size[0])


def reencoded(out: Image.Image, side: int | None, quality: int) -> tuple[bytes, str]:
    """A re-encoded image: JPEG when resizing (as the tree copy), else lossless PNG (a format DALI
    reads, the same pixels as the original)."""
    buf = io.BytesIO()
    fmt = "JPEG" if side else "PNG"
    out.save(buf, fmt, quality=quality) if fmt == "JPEG" else out.save(buf, fmt)
    return buf.getvalue(), fmt
