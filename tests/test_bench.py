"""bench/run.py: sections kept per benchmark, a failed or CUDA-only one leaves its previous section as
it was, BENCHMARKS.md is exactly the section files; bench/report.py's median (min-max)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from report import spread  # noqa: E402  (bench/ is a folder of scripts)


def load_run():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_spread_is_median_then_min_max():
    assert spread([3.0, 1.0, 2.0]) == "2.0 (1.0-3.0)"
    assert spread([1.1, 1.4, 1.2, 1.3], "{:.2f}", "x") == "1.25x (1.10-1.40)"
    assert spread([1234.0, 5678.0], "{:,.0f}") == "3,456 (1,234-5,678)"


def test_spread_of_one_value_or_equal_values_stands_alone():
    assert spread([5.0]) == "5.0"
    assert spread([1.001, 0.999], "{:.2f}", "x") == "1.00x"


def fake_project(root: Path) -> dict[str, bytes]:
    """A project with three benchmark scripts (one works, one fails, one needs CUDA) and earlier sections."""
    (root / "bench" / "results").mkdir(parents=True)
    (root / "bench" / "works.py").write_text("import sys\nprint('## Works\\n\\nbody', sys.argv[1:])\n")
    (root / "bench" / "fails.py").write_text("import sys\nprint('## Fails')\nsys.exit('broken input')\n")
    (root / "bench" / "gpu.py").write_text("print('## GPU\\n\\nnew')\n")
    (root / "bench" / "results" / "fails.md").write_text("## Fails\n\nearlier figures\n")
    (root / "bench" / "results" / "gpu.md").write_text("## GPU\n\nmeasured on a card\n")
    (root / "BENCHMARKS.md").write_text("old\n")
    return {str(p): p.read_bytes() for p in (root / "bench").rglob("*") if p.is_file()}


def test_a_failed_or_cuda_benchmark_keeps_its_section_and_benchmarks_md_is_the_sections(tmp_path, monkeypatch):
    run = load_run()
    before = fake_project(tmp_path)
    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setattr(run, "RESULTS", tmp_path / "bench" / "results")
    monkeypatch.setattr(
        run,
        "BENCHMARKS",
        [
            run.Benchmark("works", "works.py", ("--full",), ("--fast",)),
            run.Benchmark("fails", "fails.py", (), ()),
            run.Benchmark("missing", "missing.py", (), ()),
            run.Benchmark("gpu", "gpu.py", (), (), cuda=True),
        ],
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--only", "works", "fails", "gpu"])
    with pytest.raises(SystemExit) as stop:
        run.main()
    assert stop.value.code == "failed: fails (their previous sections kept)"
    for path, content in before.items():  # the failed one's and the GPU one's sections, the scripts: untouched
        assert Path(path).read_bytes() == content, path
    works = (tmp_path / "bench" / "results" / "works.md").read_text()
    title, made, body = works.split("\n\n", 2)
    assert title == "## Works"
    assert made.startswith("Command: `python bench/works.py --fast` (`make bench-quick`). Machine: ")
    assert " Date: 20" in made and "load average (1 min) " in made
    assert body == "body ['--fast']\n"
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text == run.assemble()
    sections = text.split("\n\n## ")[1:]
    assert [s.split("\n")[0] for s in sections] == ["Works", "Fails", "missing", "GPU"]
    assert sections[1] == "Fails\n\nearlier figures"
    assert sections[2] == "missing\n\nNot measured yet: `python bench/run.py --only missing`."
    assert sections[3] == "GPU\n\nmeasured on a card\n"


def test_benchmarks_md_is_exactly_what_run_py_assembles_from_the_section_files():
    run = load_run()
    assert (ROOT / "BENCHMARKS.md").read_text() == run.assemble()
    assert all((ROOT / "bench" / b.script).is_file() for b in run.BENCHMARKS)
    assert len({b.name for b in run.BENCHMARKS}) == len(run.BENCHMARKS)


def test_time_to_quality_reads_steps_and_seconds_to_a_target_and_bpb_at_a_budget():
    import time_to_quality as ttq

    points = [(100, 30.0, 2.5), (200, 60.0, 2.2), (300, 90.0, 2.1)]
    assert ttq.first_reaching(points, 2.2) == (200, 60.0)
    assert ttq.first_reaching(points, 2.0) is None
    assert ttq.at_budget(points, 89.9) == 2.2 and ttq.at_budget(points, 29.0) is None
    assert ttq.seeds_spread([2.2, 2.1]) == "2.150 (2.100-2.200)"
    assert ttq.seeds_spread([None, 60.0], "{:.1f}") == "1/2 seeds" and ttq.seeds_spread([None, None]) == "not reached"


def test_time_to_quality_report_compares_with_the_old_defaults_worst_seed():
    import time_to_quality as ttq

    table = {
        ("input.txt", "old"): [[(100, 40.0, 2.4), (200, 80.0, 2.3)], [(100, 40.0, 2.5), (200, 80.0, 2.35)]],
        ("input.txt", "new"): [[(100, 30.0, 2.3), (200, 60.0, 2.2)], [(100, 30.0, 2.4), (200, 60.0, 2.25)]],
    }
    text = ttq.report(table, ["input.txt"], [1, 2], 200, [50], 60.0)
    assert "the old default's final bpb (its worst seed's), 2.350" in text
    # old: both seeds reach 2.35 at step 200 (80 s); new: seed 1 at step 100 (30 s), seed 2 at step 200 (60 s)
    assert "| old | 2.325 (2.300-2.350) | 200 | 80.0 | 1.00x | 2.450 (2.400-2.500) |" in text
    assert "| new | 2.225 (2.200-2.250) | 150 (100-200) | 45.0 (30.0-60.0) | 0.56x | 2.350 (2.300-2.400) |" in text
