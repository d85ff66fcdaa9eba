"""Make sure pretrained backbone weights can be had before a study starts.

timm downloads weights from the Hugging Face hub into its cache on first use. Doing
that once in the driver, before any trial, turns an offline machine into one clear
message instead of N trial crashes, and spares N trials the same download.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
from huggingface_hub import try_to_load_from_cache


class PretrainedUnavailable(RuntimeError):
    pass


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, since the hub client retries for about a minute when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def is_cached(backbone: str) -> bool:
    config = timm.models.get_pretrained_cfg(backbone)
    hub_id = config.hf_hub_id if config is not None else None
    if not hub_id:
        return False
    return any(
        isinstance(try_to_load_from_cache(hub_id, filename), str)
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    )


def ensure_pretrained(backbones: tuple[str, ...], weights_files: dict[str, str]) -> None:
    """Fetch each backbone's weights into the local cache, or raise with what to do."""
    for backbone in backbones:
        if backbone in weights_files:
            if not Path(weights_files[backbone]).is_file():
                raise PretrainedUnavailable(f"weights file {weights_files[backbone]} for {backbone} does not exist")
            continue
        if is_cached(backbone):
            continue
        if not hub_reachable():
            raise PretrainedUnavailable(
                f"cannot download pretrained weights for {backbone} (offline?): rerun with --no-pretrained "
                f"for random initialisation, or pass a local file with --weights {backbone}=PATH "
                f"(a timm .safetensors or .pth for that backbone)"
            )
        try:
            timm.create_model(backbone, pretrained=True, num_classes=0)
        except Exception as error:
            raise PretrainedUnavailable(
                f"downloading pretrained weights for {backbone} failed ({type(error).__name__}): "
                f"rerun with --no-pretrained, or pass --weights {backbone}=PATH"
            ) from None
