"""Models: timm ViT backbones (``import wtours.models`` registers wtours' CPU-scale ViTs with timm), heads,
EMA, weight loading and export."""

from wtours.models import small_vits  # noqa: F401 - registers vit_nano_patch8_64 & co. with timm
