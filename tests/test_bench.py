"""The benchmarks: one runner, its presets, the per-run table (medians, the Gaussian count column only
when logged) and the rule matrix's per-cell table."""

from dream3d.eval.bench import TOY_COLUMNS, markdown_table


def _row(prompt: str, iou: float, counts: dict[int, int] | None = None) -> dict:
    plain = [c for c in TOY_COLUMNS[1:] if c.source in ("eval", "summary", "wall")]  # a one-stage run's figures
    row = {"prompt": prompt, "seed": 0, **{c.name: 0.5 for c in plain}, "matched_class": prompt[2:], "iou": iou}
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


def test_a_staged_run_shows_each_stages_solid_and_time():
    """eval --stages' per-stage volume IoU and normal error, and each stage's training seconds from summary.json."""
    from dream3d.eval.bench import STAGES

    summary = {"stages": [{"name": "coarse", "train_seconds": 61.0}, {"name": "geometry", "train_seconds": 40.5}],
               "eval_stages": {"coarse": {"volume_iou": 0.92, "normal_error_deg": 13.1, "iou": 0.9},
                               "geometry": {"volume_iou": 0.95, "normal_error_deg": 6.5}}}
    column = Column("stages", STAGES)
    figures = column.read(Path("."), summary, 0.0)
    assert column.cell(figures) == "coarse 0.920 / 13.1 / 61.0 s; geometry 0.950 / 6.500 / 40.5 s"
    assert column.read(Path("."), {"eval": {}}, 0.0) is None  # a one-stage run: the column is left out


# -- the guidance comparison (dream3d bench-guidance) ------------------------------

import json
import math
import sys
from collections import Counter
from dataclasses import replace

import pytest
import torch
from pathlib import Path

from dream3d import api, cli
from dream3d.eval.bench import (CELL_HEADERS, RULES, RULES_FULL, RULES_QUICK, TOY, TOY_QUICK, BenchError, Column, cell,
                           cells, diversity, run_and_eval, with_choices)
from dream3d.config import build_config
from dream3d.run.nfe import NFECounter


def test_the_toy_benchmark_is_a_preset_of_the_runner(tmp_path):
    runs = list(cells(TOY, tmp_path, ["steps=5"]))
    assert [(labels, seed, options) for labels, _, seed, _, options in runs] == [({"set": "faithful"}, 0, ["steps=5"])] * 12
    prompts = [prompt.split()[-2:] for _, prompt, *_ in runs]
    for words in zip(*prompts):  # every colour and every shape twice
        assert set(Counter(words).values()) == {2}
    assert runs[0][3] == tmp_path / "runs" / "a-red-sphere-seed0"
    assert [prompt for _, prompt, *_ in cells(TOY_QUICK, tmp_path, [])] == ["a red sphere", "a green cube"]


def test_a_new_column_is_one_entry_of_the_presets_column_list(tmp_path):
    preset = replace(TOY_QUICK, columns=(*TOY_QUICK.columns, Column("janus_score")))
    summaries = [{"eval": {"matched_class": "red sphere", "janus_score": value}, "seconds_per_step": 0.1,
                  "peak_memory_mb": 10.0} for value in (0.2, 0.4, 0.3)]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    rows = [{"prompt": "a red sphere", "seed": seed, **{c.name: v for c in preset.columns
                                                     if (v := c.read(tmp_path, summary, 1.0)) is not None}}
            for seed, summary in enumerate(summaries)]
    lines = markdown_table(rows, preset.columns).strip().splitlines()
    assert lines[0].endswith("| janus_score |") and "gaussians" not in lines[0]
    assert lines[-1].endswith("| 0.300 |") and "| - |" in lines[2]  # median; iou absent from the eval: "-"


@pytest.mark.parametrize("classes, distinct, bits", [
    ([], 0, 0.0),
    (["red cube"] * 4, 1, 0.0),
    (["red cube", "red cube", "blue cube", "blue cube"], 2, 1.0),
    (["red cube", "blue cube", "green cube", "purple cube"], 4, 2.0),
    (["red cube"] * 3 + ["blue cube"], 2, -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))),
])
def test_diversity_counts_classes_and_their_entropy(classes, distinct, bits):
    assert diversity(classes) == (distinct, pytest.approx(bits))


def _run(kind, prompt, seed, classes, iou=0.5, cost=1.0):
    particles = [{"matched_class": c, "iou": iou, "r_precision": 1.0, "colour_error": 0.1, "janus": 1 - iou,
                  "volume_iou": iou - 0.1} for c in classes]
    return {"rule": "sds", "representation": "nerf", "set": kind, "prompt": prompt, "seed": seed,
            "particles": particles, "seconds_per_step": cost, "nfe_per_step": 2 * cost, "peak_memory_mb": 100 * cost}


def test_cell_scores_every_particle_and_pools_seeds_per_ambiguous_prompt():
    rows = [
        _run("faithful", "a red sphere", 0, ["red sphere"], iou=0.9, cost=1.0),
        _run("faithful", "a green cube", 0, ["green cube"], iou=0.5, cost=3.0),
        _run("faithful", "a blue cone", 0, ["blue cone", "blue cone"], iou=0.6, cost=2.0),
        # two seeds of "a cube": 4 particles, 3 classes (2, 1, 1)
        _run("ambiguous", "a cube", 0, ["red cube", "blue cube"], cost=10.0),
        _run("ambiguous", "a cube", 1, ["red cube", "green cube"], cost=10.0),
        # "a red shape": one class from both seeds
        _run("ambiguous", "a red shape", 0, ["red sphere", "red sphere"], cost=10.0),
        _run("ambiguous", "a red shape", 1, ["red sphere", "red sphere"], cost=10.0),
        {"rule": "sds", "representation": "nerf", "set": "ambiguous", "prompt": "a cube", "seed": 2, "error": "boom"},
    ]
    entry = cell(rows)
    assert (entry["runs"], entry["failed"]) == (7, 1)
    assert entry["iou"] == 0.6  # median of the 4 faithful particles 0.9, 0.5, 0.6, 0.6
    assert entry["volume_iou"] == pytest.approx(0.5) and entry["janus"] == pytest.approx(0.4)
    # cost: the faithful runs only
    assert (entry["seconds_per_step"], entry["nfe_per_step"], entry["peak_memory_mb"]) == (2.0, 4.0, 200.0)
    assert entry["diversity_by_prompt"]["a cube"] == {"distinct_classes": 3, "entropy_bits": 1.5}
    assert entry["diversity_by_prompt"]["a red shape"] == {"distinct_classes": 1, "entropy_bits": 0.0}
    assert entry["distinct_classes"] == 2.0 and entry["entropy_bits"] == 0.75


def test_rules_are_run_overrides_that_win_over_the_shared_settings():
    options = RULES_FULL.options("rsd", "gaussians", ambiguous=False)
    assert options[:4] == ["--prior", "toy-unet-mv", "--representation", "gaussians"]
    assert options[-2:] == list(RULES["rsd"])
    assert "particles=4" in RULES_FULL.options("sds", "nerf", ambiguous=True)
    assert not any(o.startswith("particles=") for o in RULES_FULL.options("sds", "nerf", ambiguous=False))
    assert "particles=3" in RULES_QUICK.options("sds", "nerf", ambiguous=True)  # the quick diversity counts 3 shapes


def test_view_prompt_variants_run_by_name_only():
    """SDS without view suffixes and with Perp-Neg: selectable for a prior with view prompts, never in the default
    matrix (a toy prior's config refuses Perp-Neg)."""
    assert not {"sds-no-view", "sds-perp-neg"} & set(RULES_FULL.rules)
    matrix = with_choices(RULES_FULL, rules=("sds-no-view", "sds-perp-neg"), prior="sd")
    assert matrix.options("sds-no-view", "nerf", ambiguous=False)[-2:] == ["guidance=sds", "prompts.view_dependent=false"]
    assert matrix.options("sds-perp-neg", "nerf", ambiguous=False)[-1] == "sds.perp_neg=true"


class _ClosedForm:
    unet = None

    def predict_noise(self, x_t, t, embeddings, cameras=None):
        return torch.zeros_like(x_t)


class _WithUNet(_ClosedForm):
    def __init__(self):
        self.unet = torch.nn.Identity()

    def predict_noise(self, x_t, t, embeddings, cameras=None):
        return self.unet(x_t)


@pytest.mark.parametrize("prior", [_ClosedForm(), _WithUNet()])
def test_nfe_counter_counts_items_through_the_network_and_resets(prior):
    counter = NFECounter(prior)
    prior.predict_noise(torch.zeros(3, 3, 4, 4), None, None)
    prior.predict_noise(torch.zeros(2, 3, 4, 4), None, None)
    assert counter.take() == 5
    assert counter.take() == 0


class _UNet(torch.nn.Module):
    def forward(self, sample, timestep=None):
        return sample


def test_nfe_hook_counts_a_keyword_sample():
    prior = _WithUNet()
    prior.unet = _UNet()
    counter = NFECounter(prior)
    prior.unet(sample=torch.zeros(6, 4), timestep=None)
    assert counter.take() == 6


@pytest.mark.parametrize("prior, guidance, nfe", [
    ("toy-mv", "sds", 2),  # CFG: a conditional and an unconditional item per image
    ("toy-unet-mv", "sds", 2),
    ("toy-unet-mv", "vsd", 5),  # + the LoRA's fake score with and without the camera (2) + its training pass (1)
])
def test_nfe_is_logged_per_step_and_summarised(tiny, prior, guidance, nfe):
    cfg = build_config(tiny, {"prompt": "a red cube", "prior": prior, "guidance": guidance, "steps": 2,
                              "export": {"formats": ["glb"], "video": False, "mesh_resolution": 16}})
    result = api.run(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nfe"] for r in records] == [nfe, nfe]
    assert result.summary["nfe_per_step"] == nfe


def test_a_failed_run_is_one_line(tmp_path):
    with pytest.raises(BenchError, match="`dream3d run 'a red banana'` failed: error: .*does not know 'banana'"):
        run_and_eval("a red banana", 0, tmp_path, [])


def _bench(monkeypatch, capsys, *args, command="bench-guidance"):
    monkeypatch.setattr(sys, "argv", ["dream3d", command, *map(str, args)])
    try:
        cli.main()
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--rules", "sds,magic"], "error: unknown rule 'magic'; valid: sds, csd, ism, vsd, esd, cfd, nfsd, rsd, sds-no-view, sds-perp-neg"),
    (["--representations", "mesh"], "error: unknown representation 'mesh'; valid: nerf, gaussians, dmtet"),
    (["--rules", ","], "error: no rule to run; valid: sds, csd, ism, vsd, esd, cfd, nfsd, rsd, sds-no-view, sds-perp-neg"),
    (["--seeds", "0,x"], "error: seeds must be comma-separated integers, got '0,x'"),
    (["--particles", "0"], "error: particles must be at least 1, got 0"),
])
def test_bad_matrix_is_one_line_and_runs_nothing(monkeypatch, capsys, tmp_path, args, message):
    status, captured = _bench(monkeypatch, capsys, "--out", tmp_path / "b", *args)
    assert status == 1 and captured.err.strip() == message
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # two run processes: about a minute on a busy 2-core machine; the rule matrix's test runs the same runner
def test_quick_toy_benchmark_end_to_end(monkeypatch, capsys, tmp_path):
    tiny = ["steps=4", "resolution=16", "checkpoint_every=4", "preview_every=4", "nerf.grid_resolutions=[8,16]",
            "nerf.num_samples=24", "nerf.occupancy_resolution=16", "export.formats=[glb]", "export.video=false",
            "export.mesh_resolution=16"]
    status, captured = _bench(monkeypatch, capsys, "--quick", "--out", tmp_path, *tiny, command="bench")
    assert status == 0, captured.err
    lines = (tmp_path / "bench.md").read_text().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")][:4] == ["prompt", "seed", "matched", "iou"]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["a red sphere", "a green cube", "**median**"]
    assert captured.out.strip() == (tmp_path / "bench.md").read_text().strip()
    document = json.loads((tmp_path / "bench.json").read_text())
    assert document["options"] == tiny
    assert [Path(r["run_dir"]).parent.name for r in document["rows"]] == ["a-red-sphere-seed0", "a-green-cube-seed0"]
    assert all(0 <= r["iou"] <= 1 and r["seconds_per_step"] > 0 for r in document["rows"])


def test_quick_matrix_end_to_end(monkeypatch, capsys, tmp_path):
    status, captured = _bench(monkeypatch, capsys, "--quick", "--out", tmp_path)
    assert status == 0, captured.err
    lines = (tmp_path / "bench.md").read_text().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["rule", "representation", "runs", "failed", *CELL_HEADERS]
    assert captured.out.strip() == (tmp_path / "bench.md").read_text().strip()
    document = json.loads((tmp_path / "bench.json").read_text())
    rows, table = document["rows"], document["table"]
    assert len(rows) == len(RULES_QUICK.rules) * (len(RULES_QUICK.faithful) * len(RULES_QUICK.seeds)
                                           + len(RULES_QUICK.ambiguous) * len(RULES_QUICK.ambiguous_seeds))
    assert [(e["rule"], e["representation"]) for e in table] == [(r, "nerf") for r in RULES_QUICK.rules]
    for entry in table:
        ambiguous = [p["matched_class"] for r in rows if r["rule"] == entry["rule"] and r["set"] == "ambiguous"
                     for p in r["particles"]]
        assert len(ambiguous) == RULES_QUICK.particles * len(RULES_QUICK.ambiguous_seeds)
        assert all(c.endswith("cube") for c in ambiguous)
        assert (entry["distinct_classes"], entry["entropy_bits"]) == diversity(ambiguous)
        assert entry["failed"] == 0 and entry["nfe_per_step"] == 2.0  # CFG: 2 items through the prior per step
        assert 0 <= entry["iou"] <= 1 and entry["peak_memory_mb"] > 0


def test_the_toy_benchmark_takes_its_prompts(monkeypatch, capsys, tmp_path):
    """--prompts replaces the twelve: each is checked before the first run, so a word the prior lacks is one line."""
    status, captured = _bench(monkeypatch, capsys, "--out", tmp_path / "b", "--prompts", "a red cube,a red banana",
                              "prior=toy-mv", command="bench")
    assert status == 1 and "banana" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
