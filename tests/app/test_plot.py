import json

from lightning_compress.app.plot import main, summarise


def write_record(path, name, seed, sparsity, acc):
    path.mkdir(parents=True)
    record = {
        "config": {"name": name, "seed": seed},
        "sparsity": sparsity,
        "metrics": {"test/acc": acc},
    }
    (path / "results.json").write_text(json.dumps(record))


def test_plot_groups_by_name_and_sparsity(tmp_path, capsys):
    for i, (s, accs) in enumerate({0.5: (0.97, 0.96), 0.9: (0.95, 0.93)}.items()):
        for seed, acc in enumerate(accs):
            write_record(tmp_path / f"{i}{seed}", "gmp", seed, s, acc)
    assert main([str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    out = capsys.readouterr().out
    assert "sparsity  90.00%  accuracy  94.00 +- 1.41 (2)" in out


def test_summary_means_over_seeds():
    records = [
        {"config": {"name": "a"}, "sparsity": 0.8, "metrics": {"test/acc": a}} for a in (0.9, 0.8)
    ]
    ((s, mean, std, n),) = summarise(records)["a"]
    assert (s, round(mean, 6), n) == (0.8, 85.0, 2)
    assert std > 0


def test_plot_rejects_empty_and_malformed(tmp_path, capsys):
    assert main([str(tmp_path / "absent")]) == 2
    assert main([str(tmp_path)]) == 2
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{not json")
    assert main([str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
