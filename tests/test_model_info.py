"""model_info: exact parameter counts, MACs/FLOPs by torch.utils.flop_counter, torchvision's metadata."""

import json

from jobs.model_info import main


def test_model_info_json(capsys):
    assert main(["--format", "json"]) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert {name: row["params"] for name, row in rows.items()} == {
        "mnasnet0_5": 2_218_512,
        "mnasnet0_75": 3_170_208,
        "mnasnet1_0": 4_383_312,
        "mnasnet1_3": 6_282_256,
    }
    for row in rows.values():
        assert row["flops"] == 2 * row["macs"]
        # torchvision's card lists MACs under the name GFLOPS: the same figure, to its three decimals.
        assert round(row["macs"] / 1e9, 3) == row["torchvision_gflops"]
    assert rows["mnasnet0_5"]["macs"] == 104_455_968
    assert (rows["mnasnet0_5"]["top1"], rows["mnasnet0_5"]["top5"]) == (67.734, 87.49)
    assert (rows["mnasnet1_0"]["top1"], rows["mnasnet1_0"]["top5"]) == (73.456, 91.51)
    assert {name: row["resize_size"] for name, row in rows.items()} == {
        "mnasnet0_5": 256,
        "mnasnet0_75": 232,
        "mnasnet1_0": 256,
        "mnasnet1_3": 232,
    }


def test_model_info_table(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "| mnasnet1_3 | 6,282,256 | 526.36 | 1052.72 |" in out and "FLOPs = 2 x MACs" in out
