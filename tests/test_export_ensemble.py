"""Packed integer export (exact logits, sizes), `flatlab info` on quantized files, EoQ ensembles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flatlab.checkpoint import load_checkpoint, safe_torch_load
from flatlab.cli import main
from flatlab.errors import FlatlabError
from flatlab.quant import quantized_layers
from flatlab.quant.packing import pack_codes, packed_nbytes, unpack_codes


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str, needle: str) -> None:
    assert err.count("\n") == 1 and err.startswith("flatlab: error: "), err
    assert needle in err, err


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (1, 5, 8, 37):
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n,), generator=g)
        codes[0] = -(2 ** (bits - 1))  # both ends of the range
        codes[-1] = 2 ** (bits - 1) - 1
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8)
        assert torch.equal(unpack_codes(packed, bits, n), codes)
    with pytest.raises(FlatlabError, match="outside the"):
        pack_codes(torch.tensor([2 ** (bits - 1)]), bits)


def test_unpack_refuses_codes_that_do_not_fit() -> None:
    packed8 = pack_codes(torch.tensor([5, -7, 3]), 8)
    with pytest.raises(FlatlabError, match="do not fit their 4 bits"):
        unpack_codes(packed8, 4, 3)  # 3 bytes for 3 four-bit codes (2 bytes needed)
    packed3 = pack_codes(torch.tensor([1, 2, 3]), 3)  # 9 bits -> 2 bytes, 7 padding bits
    tampered = packed3.clone()
    tampered[-1] |= 0x80
    with pytest.raises(FlatlabError, match="beyond the last"):
        unpack_codes(tampered, 3, 3)


@pytest.fixture(scope="module")
def packed_file(qat_run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model.packed.pt"
    assert main(["export", str(qat_run), "--out", str(out), "--quiet"]) == 0
    return out


def test_export_round_trip_gives_identical_logits(qat_run: Path, packed_file: Path) -> None:
    raw = torch.load(packed_file, weights_only=True)
    assert raw["format"] == "flatlab-packed"
    assert "w0" not in raw
    original = load_checkpoint(qat_run)
    model = original.build_model()
    layers = quantized_layers(model)
    assert sorted(raw["layers"]) == sorted(layers)
    for name, entry in raw["layers"].items():
        assert entry["bits"] == 4 and entry["codes"].dtype == torch.uint8
        assert entry["codes"].numel() == math.ceil(layers[name].weight.numel() * 4 / 8)
        assert f"{name}.weight" not in raw["state_dict"] and f"{name}.weight_scale" in raw["state_dict"]
    reloaded_ckpt = load_checkpoint(packed_file)
    assert reloaded_ckpt.is_quantized and reloaded_ckpt.extra.get("packed")
    reloaded = reloaded_ckpt.build_model()
    splits = original.splits()
    for split in ("source", "target"):
        for x, _ in splits.split_batches(split, batch_size=256, max_samples=600):
            with torch.no_grad():
                assert torch.equal(model(x), reloaded(x))
    eff_a = original.build_model(effective=True).state_dict()
    eff_b = reloaded_ckpt.build_model(effective=True).state_dict()
    assert all(torch.equal(eff_a[k], eff_b[k]) for k in eff_a)


def test_evaluate_packed_file_matches_checkpoint(qat_run: Path, packed_file: Path, capsys) -> None:
    code, out_a, _ = _cli(capsys, "evaluate", str(qat_run), "--json", "--quiet", "--device", "cpu")
    code_b, out_b, _ = _cli(capsys, "evaluate", str(packed_file), "--json", "--quiet", "--device", "cpu")
    assert code == code_b == 0
    a, b = json.loads(out_a), json.loads(out_b)
    a.pop("checkpoint")
    b.pop("checkpoint")
    assert a == b


def test_info_reports_bits_sizes_and_distinct_values(qat_run: Path, packed_file: Path, capsys) -> None:
    ckpt = load_checkpoint(qat_run)
    fp_state = ckpt.build_initial_model().state_dict()
    fp32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in fp_state.values())
    qnames = {f"{n}.weight" for n in quantized_layers(ckpt.build_model())}
    n_scales = sum(t.numel() for k, t in ckpt.state_dict.items() if k.endswith("weight_scale"))
    expected = (sum(fp_state[k].numel() * 4 * 4 / 32 for k in qnames)
                + sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
                      for k, t in fp_state.items() if k not in qnames) + 4 * n_scales) / fp32
    for path in (qat_run, packed_file):
        code, out, _ = _cli(capsys, "info", str(path), "--json", "--quiet")
        assert code == 0
        info = json.loads(out)
        assert info["bits"] == 4 and info["quantized"] is True
        assert info["fp32_bytes"] == fp32
        assert info["expected_size_ratio"] == pytest.approx(expected, rel=1e-12)
        # Byte rounding per layer is the only difference between measured and expected.
        assert abs(info["packed_bytes"] - expected * fp32) < len(qnames)
        assert info["size_ratio"] < 0.35
        assert [r["layer"] for r in info["layers"]] == ["features.0", "features.3", "features.6"]
        for row in info["layers"]:
            assert 1 <= row["max_distinct_per_channel"] <= row["limit"] == 16
    # The packed file itself is much smaller than the checkpoint (which also holds w0).
    assert packed_file.stat().st_size < (qat_run / "model.pt").stat().st_size / 2
    code, out, _ = _cli(capsys, "info", str(qat_run))
    assert "max distinct/channel" in out


def test_export_refuses_fp_checkpoint(erm_run: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _cli(capsys, "export", str(erm_run), "--out", str(tmp_path / "x.pt"))
    assert code == 2
    _one_error_line(err, "full-precision checkpoint")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("edit, needle", [
    ("bits", "do not fit the model's bit-width"),
    ("extra_byte", "do not fit their 4 bits"),
    ("scale", "no floating-point weight_scale"),
])
def test_evaluate_refuses_tampered_packed_file(packed_file: Path, tmp_path: Path, capsys, edit: str,
                                               needle: str) -> None:
    payload = safe_torch_load(packed_file)
    entry = payload["layers"]["features.3"]
    if edit == "bits":
        entry["bits"] = 3
    elif edit == "extra_byte":
        entry["codes"] = torch.cat([entry["codes"], torch.zeros(1, dtype=torch.uint8)])
    else:
        del payload["state_dict"]["features.3.weight_scale"]
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    code, out, err = _cli(capsys, "evaluate", str(bad), "--device", "cpu")
    assert code == 2 and out == ""
    _one_error_line(err, needle)


def test_ensemble_is_the_mean_of_logits(erm_run: Path, qat_run: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = _cli(capsys, "ensemble", str(erm_run), str(qat_run), "--json", "--quiet", "--device", "cpu",
                        "--out", str(tmp_path / "ens"))
    assert code == 0
    result = json.loads(out)
    # Brute force: average the two models' logits on the target domain and count.
    a, b = load_checkpoint(erm_run), load_checkpoint(qat_run)
    ma, mb = a.build_model(), b.build_model()
    correct = total = 0
    for x, y in a.splits().split_batches("target", batch_size=512):
        with torch.no_grad():
            pred = ((ma(x) + mb(x)) / 2).argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
    assert result["ood_acc"] == pytest.approx(correct / total, abs=1e-12)
    for key in ("id_acc", "source_acc", "val_acc", "env1_out_acc"):
        assert key in result
    assert result["num_members"] == 2 and [m["algorithm"] for m in result["members"]] == ["erm", "qat"]
    erm_bytes, qat_bytes = (m["size_bytes"] for m in result["members"])
    assert erm_bytes == result["fp32_model_bytes"] and qat_bytes < erm_bytes / 3
    assert result["total_size_bytes"] == erm_bytes + qat_bytes
    record = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert record["ood_acc"] == result["ood_acc"]
    from flatlab.io import sha256_file

    assert record["members"][1]["sha256"] == sha256_file(qat_run / "model.pt")


def test_ensemble_results_entry_is_eoq(qat_run: Path, packed_file: Path, tmp_path: Path, capsys) -> None:
    h5 = tmp_path / "results.h5"
    code, out, _ = _cli(capsys, "ensemble", str(qat_run), str(packed_file), "--json", "--quiet",
                        "--device", "cpu", "--results", str(h5))
    assert code == 0
    result = json.loads(out)
    from flatlab.results import read_results

    data = read_results(h5)
    run = data["runs"][result["run_id"]]
    assert run["attrs"]["algorithm"] == "eoq" and run["attrs"]["bits"] == 4
    assert len(run["attrs"]["members"]) == 2
    assert run["attrs"]["ood_acc"] == pytest.approx(result["ood_acc"])
    assert len(run["ensemble"]["member_ood_acc"]) == 2


@pytest.mark.parametrize("key, value, needle", [
    ("test_envs", [1], "mix test domains"),
    ("dataset", "PACS", "mix data sets"),
    ("trial_seed", 7, "different in/out splits"),
])
def test_ensemble_refuses_mixed_members(qat_run: Path, tmp_path: Path, capsys, key: str, value, needle: str) -> None:
    payload = safe_torch_load(qat_run / "model.pt")
    payload["meta"][key] = value
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    code, out, err = _cli(capsys, "ensemble", str(qat_run), str(other), "--device", "cpu")
    assert code == 2 and out == ""
    _one_error_line(err, needle)


def test_ensemble_refuses_the_same_member_twice(qat_run: Path, capsys) -> None:
    code, _, err = _cli(capsys, "ensemble", str(qat_run), str(qat_run / "model.pt"), "--device", "cpu")
    assert code == 2
    _one_error_line(err, "same checkpoint")
