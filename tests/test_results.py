"""Result files, the run table, and the report: seed mean ± population std, HM from seed-averaged B and N, the
papers' Average row, Markdown, JSON and the bar chart; the `report` command end to end."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from promptkd.results import (
    RUN_TABLE,
    ResultError,
    aggregate,
    config_hash,
    find_results,
    format_markdown,
    make_result,
    result_filename,
    write_report,
    write_result,
)


def _result(
    dataset: str, method: str, acc1: float, *, subsample: str = "all", seed: int | None = 1, config=None, **kw
) -> dict:
    return make_result(
        dataset=dataset,
        task="zeroshot_classification",
        metrics={"acc1": acc1, "acc5": min(1.0, acc1 + 0.1), "mean_per_class_recall": acc1, "ece": 0.05},
        method=method,
        model="ViT-B-16",
        pretrained="openai",
        subsample=subsample,
        seed=seed,
        num_shots=16 if subsample != "all" else None,
        config=config or {"method": method, "lr": 0.002},
        **kw,
    )


def test_make_result_is_clip_benchmark_compatible_and_extended():
    result = _result("dtd", "coop", 0.6, subsample="base", skipped_images=["/x/a.jpg"], selection={"epoch": 20})
    for key in ("dataset", "model", "pretrained", "task", "metrics", "language"):
        assert key in result
    assert result["protocol"] == "base2new" and result["subsample"] == "base" and result["num_shots"] == 16
    assert result["skipped_images"] == 1 and result["skipped_image_paths"] == ["/x/a.jpg"]
    assert result["selection"] == {"epoch": 20} and result["config_hash"] == config_hash(
        {"lr": 0.002, "method": "coop"}
    )
    assert result_filename(result) == "coop-dtd-base-16shot-seed1-zeroshot_classification.json"
    with pytest.raises(ValueError, match="fraction"):
        _result("dtd", "coop", 60.0)  # percentages are refused: results store fractions


def test_write_result_is_atomic_and_appends_to_the_run_table(tmp_path):
    first = write_result(_result("dtd", "coop", 0.5), tmp_path)
    second = write_result(_result("dtd", "coop", 0.6, seed=2), tmp_path)
    assert json.loads(first.read_text())["metrics"]["acc1"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    rows = [json.loads(line) for line in (tmp_path / RUN_TABLE).read_text().splitlines()]
    assert [r["file"] for r in rows] == [first.name, second.name] and rows[1]["seed"] == 2
    assert rows[0]["metrics"]["acc1"] == 0.5 and rows[0]["config_hash"] == json.loads(first.read_text())["config_hash"]


def test_seeds_are_mean_and_population_std():
    report = aggregate([_result("dtd", "coop", a, seed=s) for s, a in ((1, 0.70), (2, 0.72), (3, 0.74))])
    (row,) = report.rows
    stat = row.metrics["acc1"]
    assert stat.n == 3 and stat.mean == pytest.approx(72.0)
    assert stat.std == pytest.approx(math.sqrt(8 / 3))  # population std (divide by n), as parse_test_res.py
    assert row.seeds == [1, 2, 3]


def test_hm_uses_seed_averaged_base_and_novel():
    results = [
        _result("dtd", "coop", 0.9, subsample="base", seed=1),
        _result("dtd", "coop", 0.5, subsample="new", seed=1),
        _result("dtd", "coop", 0.5, subsample="base", seed=2),
        _result("dtd", "coop", 0.9, subsample="new", seed=2),
    ]
    (row,) = aggregate(results).rows
    assert row.base.mean == pytest.approx(70.0) and row.novel.mean == pytest.approx(70.0)
    assert row.hm == pytest.approx(70.0)  # HM(mean B, mean N); the mean of per-seed HMs would be 64.29
    assert row.base.std == pytest.approx(20.0)


def test_average_row_is_hm_of_mean_base_and_mean_novel(tmp_path):
    per_dataset = {
        "method_a": {"d1": (0.7000, 0.7400), "d2": (0.6868, 0.7444)},  # means 69.34 / 74.22
        "method_b": {"d1": (0.8800, 0.8000), "d2": (0.8592, 0.8146)},  # means 86.96 / 80.73
    }
    results = [
        _result(dataset, method, value, subsample=which, seed=seed)
        for method, datasets in per_dataset.items()
        for dataset, (base, novel) in datasets.items()
        for which, value in (("base", base), ("new", novel))
        for seed in (1, 2, 3)
    ]
    report = aggregate(results)
    averages = {a.method: a for a in report.averages}
    assert averages["method_a"].base == pytest.approx(69.34) and averages["method_a"].novel == pytest.approx(74.22)
    assert round(averages["method_a"].hm, 2) == 71.70
    assert round(averages["method_b"].hm, 2) == 83.73
    assert averages["method_a"].datasets == ["d1", "d2"]
    text = format_markdown(report)
    assert "| Dataset" in text and "Base" in text and "71.70" in text and "83.73" in text
    paths = write_report(report, tmp_path)
    png = paths["plot:base2new"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "71.70" in paths["markdown"].read_text()
    saved = json.loads(paths["json"].read_text())
    assert saved["format"] == "promptkd-report" and len(saved["rows"]) == 4


def test_duplicate_seed_keeps_the_newest_and_warns():
    old = _result("dtd", "coop", 0.5)
    new = _result("dtd", "coop", 0.6)
    old["created"], new["created"] = "2024-01-01T00:00:00+00:00", "2024-01-02T00:00:00+00:00"
    report = aggregate([new, old])
    assert report.rows[0].metrics["acc1"].mean == pytest.approx(60.0) and len(report.warnings) == 1


def test_find_results_skips_other_json_and_reports_missing_folders(tmp_path):
    write_result(_result("dtd", "coop", 0.5), tmp_path / "run1")
    (tmp_path / "run1" / "config.json").write_text(json.dumps({"lr": 1}))
    (tmp_path / "run1" / ".hidden.json").write_text(json.dumps(_result("dtd", "x", 0.1)))
    clip_benchmark = {
        "dataset": "cifar10",
        "model": "ViT-B-32",
        "pretrained": "openai",
        "task": "zeroshot_classification",
        "metrics": {"acc1": 0.9, "acc5": 0.99, "mean_per_class_recall": 0.9},
        "language": "en",
    }
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "cifar10.json").write_text(json.dumps(clip_benchmark))
    found = find_results([tmp_path / "run1", tmp_path / "run2", tmp_path / "run1"])
    assert sorted(r["dataset"] for r in found) == ["cifar10", "dtd"]
    report = aggregate(found)
    assert {r.method for r in report.rows} == {"coop", "zeroshot_classification"}
    with pytest.raises(ResultError, match="no such file"):
        find_results([tmp_path / "missing"])


def test_cli_report_end_to_end(tmp_path, capsys):
    from promptkd.cli import report

    for seed, (base, novel) in enumerate(((0.8, 0.7), (0.82, 0.72)), start=1):
        write_result(_result("dtd", "coop", base, subsample="base", seed=seed), tmp_path / "runs")
        write_result(_result("dtd", "coop", novel, subsample="new", seed=seed), tmp_path / "runs")
    write_result(_result("eurosat", "zsclip", 0.48, seed=None), tmp_path / "runs")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.run(parser.parse_args([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])) == 0
    out = capsys.readouterr().out
    assert "81.00 ± 1.00" in out and "71.00 ± 1.00" in out and f"{2 * 81 * 71 / 152:.2f}" in out
    assert "48.00" in out
    assert (tmp_path / "report" / "report.md").is_file() and list((tmp_path / "report").glob("report_*.png"))
    with pytest.raises(ResultError, match="no result JSON"):
        report.run(parser.parse_args([str(tmp_path / "report")]))  # report.json is not a result


# ---------------------------------------------------------------------------------------------------------------
# Seeds and noise: intervals, "within noise", refusal to pool what is not one experiment


def test_interval_is_student_t_with_n_minus_1_dof():
    from promptkd.results import Stat, t_critical

    assert t_critical(1) == pytest.approx(12.7062, abs=1e-4) and t_critical(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_critical(4) == pytest.approx(2.7764, abs=1e-4) and t_critical(10**6) == pytest.approx(1.95996, abs=1e-4)
    stat = Stat.of([93.7, 89.2, 97.6])  # the Caltech base accuracies users report for PromptKD's three seeds
    assert stat.mean == pytest.approx(93.5) and stat.sample_std == pytest.approx(math.sqrt(17.67))
    half = 4.302653 * math.sqrt(17.67) / math.sqrt(3)
    assert stat.ci95 == pytest.approx([93.5 - half, 93.5 + half], abs=1e-4)  # [83.06, 103.94]
    assert stat.ci_text() == f"[{93.5 - half:.2f}, {93.5 + half:.2f}]"
    assert Stat.of([70.0]).ci95 is None and Stat.of([70.0]).ci_text() == "1 seed, no interval"


def test_welch_test_and_the_within_noise_statement():
    from promptkd.results import Stat, noise_note, welch_test

    a, b = Stat.of([1.0, 2.0, 3.0, 4.0]), Stat.of([2.0, 3.0, 5.0, 9.0, 1.0])
    t, df, p = welch_test(a, b)
    assert t == pytest.approx(-0.964901, abs=1e-6) and df == pytest.approx(5.520788, abs=1e-6)
    assert p == pytest.approx(0.374935, abs=1e-6)  # scipy.stats.ttest_ind(..., equal_var=False)
    assert "within noise" in noise_note(b, a) and noise_note(b, b) == "best"
    far = Stat.of([10.0, 10.5, 11.0])
    assert "within noise" not in noise_note(far, a) and "(p 0.0" in noise_note(far, a)
    assert "too few seeds" in noise_note(far, Stat.of([1.0]))


def _b2n(method, seed, base, novel, **config):
    return [
        _result("dtd", method, base, subsample="base", seed=seed, **config),
        _result("dtd", method, novel, subsample="new", seed=seed, **config),
    ]


def test_report_shows_intervals_and_says_when_methods_are_within_noise():
    results = [
        *_b2n("coop", 1, 0.80, 0.70),
        *_b2n("coop", 2, 0.82, 0.72),
        *_b2n("coop", 3, 0.81, 0.69),
        *_b2n("cocoop", 1, 0.79, 0.74),
        *_b2n("cocoop", 2, 0.78, 0.75),
        *_b2n("cocoop", 3, 0.80, 0.73),
        *_b2n("zsclip", 1, 0.50, 0.50),
        *_b2n("zsclip", 2, 0.52, 0.51),
    ]
    report = aggregate(results)
    rows = {r.method: r for r in report.rows}
    assert rows["cocoop"].vs_best == "best"
    assert "within noise" in rows["coop"].vs_best and "within noise" not in rows["zsclip"].vs_best
    assert rows["coop"].hm_seeds.n == 3 and rows["coop"].base.ci95 is not None
    text = format_markdown(report)
    assert "vs best" in text and "95% intervals" in text and "Welch" in text
    assert f"{rows['coop'].base.ci_text()}" in text


def test_one_seed_says_no_interval():
    text = format_markdown(aggregate(_b2n("coop", 1, 0.8, 0.7)))
    assert "1 seed, no interval" in text


def _cli_report(tmp_path, results):
    from promptkd.cli.main import main

    folder = tmp_path / "runs"
    for r in results:
        write_result(r, folder, filename=f"{len(list(folder.glob('*.json'))) if folder.exists() else 0}.json")
    before = sorted(p.name for p in folder.iterdir())
    code = main(["report", str(folder), "--no-plot", "--out", str(tmp_path / "report")])
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing stored is lost or replaced
    assert (tmp_path / "report" / "report.md").exists() == (code == 0)  # a refusal writes nothing
    return code


@pytest.mark.parametrize(
    ("second", "named"),
    [
        ({"config": {"method": "coop", "lr": 0.01}}, "recipe (lr 0.002 vs 0.01)"),
        ({"classnames": ["a", "b", "x"]}, "class list"),
        ({"num_samples": 500}, "number of test images"),
        ({"config": {"method": "cocoop", "lr": 0.002}}, "recipe (method"),
    ],
)
def test_report_refuses_to_pool_other_experiments_as_seeds(tmp_path, capsys, second, named):
    first = _result("dtd", "coop", 0.8, seed=1, classnames=["a", "b", "c"], num_samples=400)
    other = _result("dtd", "coop", 0.7, seed=2, **{"classnames": ["a", "b", "c"], "num_samples": 400, **second})
    assert _cli_report(tmp_path, [first, other]) == 2
    err = capsys.readouterr().err
    assert "not seeds of one experiment" in err and named in err and "Traceback" not in err


def test_report_pools_seeds_that_differ_only_in_seed_and_folder(tmp_path, capsys):
    results = [
        _result(
            "dtd", "coop", 0.8, seed=s, config={"method": "coop", "seed": s, "out": f"r/seed_{s}", "train": {"seed": s}}
        )
        for s in (1, 2)
    ]
    assert _cli_report(tmp_path, results) == 0
    assert "80.00 ± 0.00" in capsys.readouterr().out


def test_per_seed_teacher_paths_pool_but_another_teacher_does_not():
    def student(seed, teacher_dir, sha):
        config = {
            "method": "promptkd",
            "teacher": f"/r/{teacher_dir}/base2new/dtd/promptkd/seed_{seed}/teacher/prompts.safetensors",
            "teacher_identity": {"method": "promptsrc", "checkpoint_sha256": sha, "about": {"seed": seed}},
        }
        return _result("dtd", "promptkd", 0.8, seed=seed, config=config)

    assert aggregate([student(1, "coop", "a" * 64), student(2, "coop", "b" * 64)]).rows[0].metrics["acc1"].n == 2
    with pytest.raises(ResultError, match=r"recipe \(teacher .*coop\+atprompt"):
        aggregate([student(1, "coop+atprompt", "a" * 64), student(2, "coop", "b" * 64)])
