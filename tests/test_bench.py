"""The benchmark table: one line per run, medians, and the Gaussian count column only when logged."""

from dream3d.bench import COLUMNS, markdown_table


def _row(prompt: str, iou: float, counts: dict[int, int] | None = None) -> dict:
    row = {"prompt": prompt, "seed": 0, "matched_class": prompt[2:], **{c: 0.5 for c in COLUMNS}, "iou": iou}
    row["wall_seconds"] = 123.456
    if counts is not None:
        row["num_gaussians"] = counts
    return row


def test_median_row_and_formats():
    table = markdown_table([_row("a red cube", 0.9), _row("a red cone", 0.7), _row("a red torus", 0.8)])
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3 + 1
    assert "gaussians" not in lines[0]
    median = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    assert median[0] == "**median**" and median[3] == "0.800"  # iou, the first column after prompt/seed/matched
    assert "123.5" in lines[2]


def test_gaussian_counts_column_when_every_run_logged_them():
    counts = {1: 4096, 100: 4096, 200: 12000, 600: 11000}
    table = markdown_table([_row("a red cube", 0.9, counts)])
    assert "gaussians at steps 1/100/200/300/400/600" in table
    assert "4096 / 4096 / 12000 / - / - / 11000" in table
