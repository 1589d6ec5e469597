"""Loose image files: each listed image file is one input."""

from __future__ import annotations

import pyarrow as pa

from mnasnet_batch.inputs.layout import ImageURILayout, has_extensions


class FilesLayout(ImageURILayout):
    """Loose image files."""

    name = "files"
    noun = "image files"
    kind = "images"

    def wanted(self) -> str:
        return f"image files with extensions {', '.join(self.image_extensions)}"

    @property
    def extensions(self) -> tuple[str, ...]:
        return self.image_extensions

    def selects(self, files: pa.Array, single: bool) -> pa.BooleanArray:
        return has_extensions(files, self.extensions)  # a single file named explicitly must be an image too
