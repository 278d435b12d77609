"""tools/sensitivity.py: the lift of the visual branch over joint training, per seed, from run folders."""

import json

import pytest

from tools import sensitivity


def write_run(folder, name, seed, visual, modality="both", exp_name=None):
    run = folder / f"{name}__{seed}"
    run.mkdir(parents=True)
    key = "test/acc" if modality == "visual" else "test/acc_visual"
    args = {"modality": modality, "exp_name": exp_name}
    results = {"script": name, "seed": seed, "args": args, "last": {key: visual, "test/acc": 0.99}}
    if modality == "visual":
        results["last"] = {"test/acc": visual}
    (run / "results.json").write_text(json.dumps(results))


def test_lift_is_per_seed_against_joint_training_of_the_same_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, joint in ((0, 0.30), (1, 0.40)):
        write_run(a, "baseline", seed, joint)
    write_run(a, "baseline", 7, 0.10, modality="visual")  # the visual-alone run reads test/acc
    write_run(a, "ogm", 0, 0.35)
    write_run(a, "ogm", 1, 0.38)
    write_run(a, "aug", 0, 0.80, exp_name="aug_trained")
    write_run(b, "baseline", 0, 0.50)
    write_run(b, "dgl", 0, 0.75)
    lines = sensitivity.table([("ref", str(a)), ("other", str(b))]).splitlines()
    assert lines[0] == "| method | ref | other |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert rows["joint training: visual branch (%)"] == ["30.0, 40.0", "50.0 |"]
    assert rows["OGM-GE"] == ["+5.0, -2.0", "– |"]
    assert rows["AUG `--train-new-heads`"] == ["+50.0", "– |"]
    assert rows["DGL"] == ["–", "+25.0 |"]
    assert "visual encoder alone" not in rows  # seed 7 has no joint run to compare with
    assert list(rows)[:2] == ["joint training: visual branch (%)", "OGM-GE"]


def test_a_set_without_label_is_refused(capsys):
    with pytest.raises(SystemExit):
        sensitivity.main(["runs/x"])
    assert "expected LABEL=FOLDER" in capsys.readouterr().err
