"""A contact sheet: every finished asset's last preview (a strip of views around it) with its prompt."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from dream3d.rundir.atomic import atomic_path
from dream3d.rundir.job import DONE, Job
from dream3d.rundir.result import Result

CAPTION_PX = 16
COLUMNS = 3


def contact_sheet(records: list[Job], path: Path, columns: int = COLUMNS) -> Path | None:
    """Writes a grid of (caption, preview) tiles for the done records that have a preview;
    returns the path, or None if there is none to show."""
    tiles = []
    for record in records:
        preview = Result.load(Path(record.run_dir)).preview if record.state == DONE and record.run_dir else None
        if preview is not None:
            with Image.open(preview) as image:
                tiles.append((record.prompt, image.convert("RGB")))
    if not tiles:
        return None
    width = max(image.width for _, image in tiles)
    height = max(image.height for _, image in tiles) + CAPTION_PX
    columns = min(columns, len(tiles))
    sheet = Image.new("RGB", (columns * width, math.ceil(len(tiles) / columns) * height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (prompt, image) in enumerate(tiles):
        x, y = (index % columns) * width, (index // columns) * height
        draw.text((x + 4, y + 2), prompt, fill="black")
        sheet.paste(image, (x, y + CAPTION_PX))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
