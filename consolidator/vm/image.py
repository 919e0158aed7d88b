"""The builtin guest image ``tiny``: a kernel, and an initramfs with static busybox."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

CLOUD_KERNEL_META = "linux-image-cloud-amd64"


def host_kernel() -> tuple[Path, Path]:
    rel = platform.release()
    return Path(f"/boot/vmlinuz-{rel}"), Path(f"/lib/modules/{rel}")


def describe_kernel_source(images_dir: Path | None) -> tuple[str, bool, str | None]:
    """Where the builtin image's kernel comes (or would come) from: (text, usable, fix)."""
    if images_dir is not None:
        manifest = images_dir / "tiny" / "manifest.json"
        if manifest.exists():
            try:
                m = json.loads(manifest.read_text())
                return f"cached in {manifest.parent}: {m['kernel']['source']}", True, None
            except (OSError, ValueError, KeyError):
                pass
    vmlinuz, modules = host_kernel()
    if os.access(vmlinuz, os.R_OK) and modules.is_dir():
        return f"the host's kernel {vmlinuz} with {modules}", True, None
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        return (f"Debian's cloud kernel ({CLOUD_KERNEL_META}) via apt-get download, unpacked "
                f"into the image cache, not installed (no {vmlinuz} here)", True, None)
    return (f"none: no {vmlinuz} and no apt-get", False,
            "set images.<name>.kernel in the inventory, or install a kernel in /boot")
