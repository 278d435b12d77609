from conftest import run_script, read_results
def test_baseline_smoke(tiny_data, tmp_path):
    proc, run = run_script("baseline.py", tiny_data, tmp_path, "--epochs", "1", "--max-steps", "2")
    r = read_results(run)
    assert 0 <= r["best"]["test/acc"] <= 1
