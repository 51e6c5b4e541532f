"""nvfp4q calibrate, and quantize --calibration, end to end on a tiny model in stock llama.cpp."""

import json

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from helpers import logits, rel_rmse, run_cli, tensors, tiny_model
from nvfp4q import calibration

CTX = 32
TEXT = " ".join(f"the {w} of the {v} was {n} times the old one." for n, (w, v) in enumerate(
    [("river", "valley"), ("story", "people"), ("light", "morning"), ("price", "market"), ("song", "night"),
     ("door", "house"), ("voice", "crowd"), ("rule", "game")] * 6))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal")
    src = tiny_model(folder)
    text = folder / "text.txt"
    text.write_text(TEXT + "\n")
    cal = folder / "tiny.cal.gguf"
    proc = run_cli("calibrate", src, "--text", text, "-o", cal, "--ctx", CTX, "--json", check=True)
    return src, text, cal, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def searched(calibrated, tmp_path_factory):
    """The tiny model quantized with the calibration file read as an ordinary imatrix."""
    src, _, cal_path, _ = calibrated
    out = tmp_path_factory.mktemp("searched") / "plain.gguf"
    run_cli("quantize", src, out, "--imatrix", cal_path, "-q", check=True)
    return out


def layer0_input(src, text) -> np.ndarray:
    """The first layer's attention input computed here from the file's weights, chunk by chunk as
    llama-imatrix cuts the text: rmsnorm(embedding) * attn_norm."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(src), n_ctx=64, verbose=False)
    try:
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
        tokens = llm.tokenize(text.read_text().removesuffix("\n").encode(), add_bos=add_bos, special=False)
        bos = llm.token_bos()
    finally:
        llm.close()
    r = GGUFReader(src)
    ts = {t.name: t for t in r.tensors}
    emb = dequantize(ts["token_embd.weight"].data, ts["token_embd.weight"].tensor_type).astype(np.float64)
    norm = np.asarray(ts["blk.0.attn_norm.weight"].data, np.float64)
    eps = float(r.get_field("llama.attention.layer_norm_rms_epsilon").contents())
    rows = []
    for c in range(len(tokens) // CTX):
        chunk = list(tokens[c * CTX:(c + 1) * CTX])
        if add_bos:
            chunk[0] = bos
        x = emb[chunk]
        rows.append(x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * norm)
    return np.concatenate(rows)


def test_covariance_equals_the_one_from_activations_computed_independently(calibrated):
    src, text, cal_path, doc = calibrated
    x = layer0_input(src, text)
    cal = calibration.load(cal_path)
    m = cal.for_weight("blk.0.attn_q.weight")
    assert m.whole and m.count == x.shape[0] == doc["tokens"]
    first = np.arange(x.shape[0]) % CTX == 0
    assert first.sum() == doc["chunks"] > 1
    want = x[~first].T @ x[~first]  # each chunk's first token (BOS) is left out of the covariance
    assert np.allclose(m.blocks[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # and kept in the imatrix diagonal, which is llama-imatrix's: the mean of x^2 over every token
    diag = (x * x).mean(axis=0)
    assert np.allclose(cal.imatrix.entries["blk.0.attn_q.weight"].values[0], diag, rtol=1e-4, atol=1e-4 * diag.max())


def test_file_is_an_imatrix_with_the_covariance_diagonal_and_shared_inputs(calibrated):
    src, _, cal_path, doc = calibrated
    cal = calibration.load(cal_path)
    assert cal.sources["blk.0.attn_k.weight"] == cal.sources["blk.0.attn_v.weight"] == "blk.0.attn_q.weight"
    assert cal.sources["blk.1.ffn_up.weight"] == "blk.1.ffn_gate.weight"
    assert cal.sources["blk.1.ffn_down.weight"] == "blk.1.ffn_down.weight"
    weights = [n for n in tensors(src) if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n]
    assert sorted(cal.sources) == sorted(weights) and doc["weights"] == len(weights)
    assert doc["inputs"] == 4 * 2 and doc["banded_inputs"] == []
    for name, entry in cal.imatrix.entries.items():
        m = cal.for_weight(name)
        first = entry.values[0] * np.float32(m.count) - m.diagonal()  # the chunks' first tokens' x^2
        assert np.all(first >= -1e-4 * entry.values[0] * m.count) and first.max() > 0
    assert cal.imatrix.chunk_count == doc["chunks"] and cal.imatrix.chunk_size == CTX
    # nvfp4q reads it as an ordinary imatrix
    proc = run_cli("quantize", src, cal_path.parent / "as-imatrix.gguf", "--imatrix", cal_path, "--dry-run", "--json",
                   check=True)
    assert json.loads(proc.stdout)["imatrix"]["without_data"] == []


def test_band_keeps_diagonal_blocks_and_reports_what_it_drops(calibrated, tmp_path):
    src, text, full_path, _ = calibrated
    out = tmp_path / "banded.gguf"
    doc = json.loads(run_cli("calibrate", src, "--text", text, "-o", out, "--ctx", CTX, "--band", 64, "--json",
                             check=True).stdout)
    assert doc["banded_inputs"]
    full, banded = calibration.load(full_path), calibration.load(out)
    for name in doc["banded_inputs"]:
        f, b = full.for_weight(name), banded.for_weight(name)
        assert b.band == 64 and not b.whole and 0 < b.offband < 1
        for k in range(b.blocks.shape[0]):
            n = min(64, f.width - 64 * k)
            assert np.allclose(b.blocks[k, :n, :n], f.blocks[0, 64 * k:64 * k + n, 64 * k:64 * k + n],
                               rtol=1e-5, atol=1e-5 * np.abs(f.blocks).max())


@pytest.fixture(scope="module")
def sketched(calibrated, tmp_path_factory):
    """The tiny model's inputs, every one sketched: at rank 16, and at full rank (the sketch size
    is capped at the width)."""
    src, text, _, _ = calibrated
    folder = tmp_path_factory.mktemp("sketched")
    out = {}
    for size in (16, 4096):
        out[size] = folder / f"sketch{size}.cal.gguf"
        out[size, "doc"] = json.loads(run_cli("calibrate", src, "--text", text, "-o", out[size], "--ctx", CTX,
                                              "--sketch", size, "--sketch-above", 64, "--json", check=True).stdout)
    return out


def test_sketch_is_the_covariance_at_full_rank_and_a_part_of_it_below(calibrated, sketched):
    _, _, full_path, full_doc = calibrated
    full = calibration.load(full_path)
    for size in (16, 4096):
        doc, cal = sketched[size, "doc"], calibration.load(sketched[size])
        assert sorted(doc["sketched_inputs"]) == sorted(full.moments) and doc["banded_inputs"] == []
        for src, m in full.moments.items():
            s = cal.moments[src]
            assert isinstance(s, calibration.Sketch) and s.count == m.count
            assert s.max_rank == min(size, m.width)
            h = m.blocks[0].astype(np.float64)
            assert np.allclose(s.diag, np.diag(h), rtol=1e-5)
            f = s.factor.astype(np.float64)
            rest = h - f @ f.T
            if size == 16:  # the Nystrom part never exceeds H: what it leaves out is positive semidefinite
                assert 0 < s.offband < 1
                assert np.linalg.eigvalsh(rest).min() > -1e-4 * np.abs(h).max()
            else:
                np.fill_diagonal(rest, 0.0)
                assert np.abs(rest).max() < 1e-2 * np.abs(h).max() and s.offband < 1e-3
    assert sketched[16, "doc"]["moment_bytes"] < full_doc["moment_bytes"]


def test_sketched_calibration_through_quantize(calibrated, searched, sketched, tmp_path):
    """A sketched input takes the low-rank feedback at any width: it runs in llama.cpp, passes on
    less error than the search, and its bytes do not depend on the thread count; --rank 0, which
    needs whole covariances, is refused in one line."""
    src, _, full_path, _ = calibrated
    outs = []
    for n in (1, 2):
        outs.append(tmp_path / f"s{n}.gguf")
        run_cli("quantize", src, outs[-1], "--calibration", sketched[16], "--threads", n, "-q", check=True)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert rel_rmse(logits(outs[0]), logits(src)) < 0.2
    lower, nvfp4 = lower_output_errors(src, full_path, searched, outs[0])
    assert lower == nvfp4 > 0
    assert "--sketch 0" in one_error_line(run_cli("quantize", src, tmp_path / "r0.gguf", "--calibration",
                                                  sketched[16], "--rank", 0))
    assert not any(p.name.endswith("r0.gguf") for p in tmp_path.iterdir())
    got = json.loads(run_cli("inspect", sketched[16], "--json", "--tensors", "ffn_down", check=True).stdout)
    assert len(got["calibration"]["sketched_inputs"]) == got["calibration"]["inputs"]
    assert all(e["sketch"] == 16 and e["band"] is None and 0 < e["offband_share"] < 1 for e in got["entries"])


def test_quantize_with_calibration_runs_in_llama_cpp_and_lowers_the_output_error(calibrated, searched, tmp_path):
    src, _, cal_path, _ = calibrated
    fed = tmp_path / "fed.gguf"
    run_cli("quantize", src, fed, "--calibration", cal_path, "-q", check=True)
    assert rel_rmse(logits(fed), logits(src)) < 0.2
    lower, nvfp4 = lower_output_errors(src, cal_path, searched, fed)
    assert lower == nvfp4 > 0
    meta = GGUFReader(fed).get_field("nvfp4q.calibration.tensors")
    assert meta is not None and meta.contents() > 0
    assert GGUFReader(fed).get_field("nvfp4q.calibration.passes").contents() == 3
    doc = json.loads(run_cli("quantize", src, tmp_path / "dry.gguf", "--calibration", cal_path, "--shrink", 0.3,
                             "--passes", 1, "--dry-run", "--json", check=True).stdout)
    assert doc["options"]["calibration"] == {"path": str(cal_path), "shrink": 0.3, "damp": 0.01, "scales": "search",
                                             "error_feedback": True, "rank": 64, "passes": 1}
    assert {t["feedback"] for t in doc["tensors"] if t["to"] == "NVFP4"} == {"whole"}
    assert {t["feedback"] for t in doc["tensors"] if t["to"] != "NVFP4"} == {None}


def lower_output_errors(src, cal_path, plain, fed) -> tuple[int, int]:
    """Of the NVFP4 tensors with a covariance, how many pass on a lower error tr(E H E^T) in fed
    than in plain, and how many there are."""
    cal = calibration.load(cal_path)
    srcs, ps, fs = tensors(src), tensors(plain), tensors(fed)
    lower = nvfp4 = 0
    for name in cal.sources:
        if ps[name].tensor_type.name != "NVFP4":
            continue
        m = cal.for_weight(name)
        h = m.blocks[0].astype(np.float64) / m.count
        w = dequantize(srcs[name].data, srcs[name].tensor_type).astype(np.float64)
        g = float(ps[name.removesuffix(".weight") + ".scale"].data[0]) if name.removesuffix(".weight") + ".scale" in ps else 1.0
        errs = []
        for t in (ps[name], fs[name]):
            e = dequantize(t.data, t.tensor_type).astype(np.float64) * g - w
            errs.append(np.einsum("ij,jk,ik->", e, h, e))
        lower += errs[1] < errs[0]
        nvfp4 += 1
    return lower, nvfp4


def test_low_rank_covariances_through_quantize(calibrated, searched, tmp_path):
    """--rank 2 puts the tiny model's 128-wide inputs (wider than 32 x 2) on the low-rank feedback:
    it runs in llama.cpp, passes on less error than the search and other bytes than the whole
    covariance, and its bytes do not depend on the thread count."""
    src, _, cal_path, _ = calibrated
    outs = []
    for n in (1, 2):
        outs.append(tmp_path / f"r{n}.gguf")
        shown = run_cli("quantize", src, outs[-1], "--calibration", cal_path, "--rank", 2, "--threads", n, "-q",
                        check=True).stdout
        assert "error feedback: 0 inputs through their whole covariance, 4 through rank 2" in shown
    assert outs[0].read_bytes() == outs[1].read_bytes()
    whole = tmp_path / "whole.gguf"
    run_cli("quantize", src, whole, "--calibration", cal_path, "-q", check=True)
    low, full = tensors(outs[0]), tensors(whole)
    nvfp4 = [name for name, t in low.items() if t.tensor_type.name == "NVFP4"]
    assert nvfp4 and all(not np.array_equal(low[name].data, full[name].data) for name in nvfp4)
    assert rel_rmse(logits(outs[0]), logits(src)) < 0.2
    lower, n = lower_output_errors(src, cal_path, searched, outs[0])
    assert lower == n > 0
    assert GGUFReader(outs[0]).get_field("nvfp4q.calibration.rank").contents() == 2
    for args, feedback in (((2,), "low_rank"), ((4,), "whole"), ((2, "--no-error-feedback"), None)):
        doc = json.loads(run_cli("quantize", src, tmp_path / "dry.gguf", "--calibration", cal_path, "--rank", *args,
                                 "--dry-run", "--json", check=True).stdout)
        assert {t["name"]: t["feedback"] for t in doc["tensors"] if t["to"] == "NVFP4"} == dict.fromkeys(nvfp4, feedback)
        inputs = sorted({calibration.load(cal_path).sources[name] for name in nvfp4})
        assert doc["feedback"] == (feedback and {"whole": inputs * (feedback == "whole"),
                                                 "low_rank": inputs * (feedback == "low_rank"), "rank": args[0]})


def test_calibration_shrunk_to_its_diagonal_gives_the_imatrix_search_bytes(calibrated, searched, tmp_path):
    """--shrink 1 leaves H's diagonal: nothing moves, and every tensor is the search's with the
    file read as an imatrix, through the whole quantize path."""
    src, _, cal_path, _ = calibrated
    diag = tmp_path / "diag.gguf"
    run_cli("quantize", src, diag, "--calibration", cal_path, "--shrink", 1, "-q", check=True)
    ps, ds = tensors(searched), tensors(diag)
    assert ps.keys() == ds.keys() and any(t.tensor_type.name == "NVFP4" for t in ps.values())
    assert all(np.array_equal(ps[n].data, ds[n].data) for n in ps)


def test_calibrate_stores_the_roundings_own_factors(calibrated, tmp_path):
    """For the inputs that quantize's defaults round through the whole covariance, and only those."""
    from nvfp4q import rounding

    src, _, cal_path, _ = calibrated
    cal = calibration.load(cal_path)
    assert cal.factor_settings == (rounding.DAMP, rounding.SHRINK)
    doc = json.loads(run_cli("quantize", src, tmp_path / "dry.gguf", "--calibration", cal_path, "--dry-run", "--json",
                             check=True).stdout)
    whole = set(doc["feedback"]["whole"])
    assert whole and set(cal.factors) == whole
    for name in whole:
        assert cal.factors[name].tobytes() == rounding.factor(cal.moments[name]).tobytes(), name


def test_quantize_takes_a_stored_factor_only_for_its_settings(calibrated, tmp_path):
    """Each stored U replaced by the identity (a valid U that moves no error): with the settings it
    was stored for the output changes, so it is read; with another --damp both files give the
    bytes of U made afresh."""
    from nvfp4q import gguf_header

    src, _, cal_path, _ = calibrated
    data = bytearray(cal_path.read_bytes())
    for t in gguf_header.read(cal_path).tensors:
        if t.name.endswith(calibration.FACTOR):
            band, blocks = int(t.shape[0]), int(t.shape[2])
            data[t.offset:t.offset + t.nbytes] = np.tile(np.eye(band, dtype=np.float32), (blocks, 1, 1)).tobytes()
    plain = tmp_path / "plain.cal.gguf"
    plain.write_bytes(bytes(data))
    outs = {}
    for name, cal in (("stored", cal_path), ("identity", plain)):
        for opts in ((), ("--damp", 0.02)):
            outs[name, opts] = tmp_path / f"{name}{len(opts)}.gguf"
            run_cli("quantize", src, outs[name, opts], "--calibration", cal, *opts, "-q", check=True)
    data = {k: {n: t.data.tobytes() for n, t in tensors(path).items()} for k, path in outs.items()}
    assert data["stored", ()] != data["identity", ()]
    damped = ("--damp", 0.02)
    assert data["stored", damped] == data["identity", damped]  # the metadata differs: it names the file


def test_same_bytes_whatever_the_thread_counts(calibrated, tmp_path):
    src, _, cal_path, _ = calibrated
    outs = []
    for n in (1, 2):
        outs.append(tmp_path / f"t{n}.gguf")
        run_cli("quantize", src, outs[-1], "--calibration", cal_path, "--threads", n, "-q", check=True)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def one_error_line(proc) -> str:
    assert proc.returncode in (1, 2), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvfp4q: error:"), proc.stderr
    return lines[0]


def test_bad_calibration_inputs_fail_in_one_line(calibrated, tmp_path):
    src, text, cal_path, _ = calibrated
    other = tiny_model(tmp_path / "wide", embd=192)
    assert "wide" in one_error_line(run_cli("quantize", other, tmp_path / "o.gguf", "--calibration", cal_path))
    imat = tmp_path / "plain.imatrix.gguf"
    data = cal_path.read_bytes()
    from helpers import gguf_arrays, write_imatrix

    write_imatrix(imat, gguf_arrays("blk.0.attn_q.weight", np.ones((1, 128), np.float32), np.ones((1, 1), np.float32)))
    assert "calibration" in one_error_line(run_cli("quantize", src, tmp_path / "o.gguf", "--calibration", imat))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    one_error_line(run_cli("quantize", src, tmp_path / "o.gguf", "--calibration", cut))
    assert not any(p.name.startswith(".o.gguf") or p.name == "o.gguf" for p in tmp_path.iterdir())


def test_non_finite_covariances_and_sketches_fail_in_one_line(calibrated, sketched, tmp_path):
    from nvfp4q import gguf_header

    src = calibrated[0]
    for path, suffix in ((calibrated[2], ".xtx"), (calibrated[2], ".u"), (sketched[16], ".sketch"),
                         (sketched[16], ".diag")):
        t = next(t for t in gguf_header.read(path).tensors if t.name.endswith(suffix))
        data = bytearray(path.read_bytes())
        data[t.offset + 4 * 7:t.offset + 4 * 8] = np.float32(np.nan).tobytes()
        bad = tmp_path / f"bad{suffix}.cal.gguf"
        bad.write_bytes(bytes(data))
        line = one_error_line(run_cli("quantize", src, tmp_path / "o.gguf", "--calibration", bad))
        assert t.name in line and "non-finite" in line
    assert not any(p.name.endswith("o.gguf") for p in tmp_path.iterdir())


def test_stopping_at_the_final_norm_changes_no_statistic(calibrated, tmp_path, monkeypatch):
    """calibrate ends each decode at the final norm, before the output head: every moment and
    diagonal equals that of a decode run to its end, and the stop did happen."""
    from nvfp4q import calibrate as calibrate_module

    src, text, cal_path, _ = calibrated
    answers = []
    take = calibrate_module.Collector._take

    def recorded(self, ptr):
        answers.append(take(self, ptr))
        return answers[-1]
    monkeypatch.setattr(calibrate_module.Collector, "_take", recorded)
    calibrate_module.calibrate(src, text, tmp_path / "stopped.gguf", ctx=CTX)
    assert answers.count(False) == calibration.load(cal_path).imatrix.chunk_count  # once per chunk
    monkeypatch.setattr(calibrate_module, "LAST_NODE", b"no such node")
    calibrate_module.calibrate(src, text, tmp_path / "whole.gguf", ctx=CTX)
    stopped, whole = (calibration.load(tmp_path / n) for n in ("stopped.gguf", "whole.gguf"))
    assert stopped.sources == whole.sources and stopped.imatrix.entries.keys() == whole.imatrix.entries.keys()
    for src_name, m in whole.moments.items():
        assert np.array_equal(stopped.moments[src_name].blocks, m.blocks) and stopped.moments[src_name].count == m.count
    for name, e in whole.imatrix.entries.items():
        assert np.array_equal(stopped.imatrix.entries[name].values, e.values)


def test_calibrate_refuses_bad_input_in_one_line(calibrated, tmp_path):
    src, text, cal_path, _ = calibrated
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "too short" in one_error_line(run_cli("calibrate", src, "--text", short, "-o", tmp_path / "c.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    one_error_line(run_cli("calibrate", bad, "--text", text, "-o", tmp_path / "c.gguf"))
    assert "exists" in one_error_line(run_cli("calibrate", src, "--text", text, "-o", cal_path))
    assert "input" in one_error_line(run_cli("calibrate", src, "--text", text, "-o", src, "--overwrite"))
    one_error_line(run_cli("calibrate", src, "--text", text, "-o", tmp_path / "c.gguf", "--band", 32))
    assert not (tmp_path / "c.gguf").exists()
    assert not any(p.name.startswith(".c.gguf") for p in tmp_path.iterdir())


def test_inspect_shows_a_calibration_file(calibrated):
    from nvfp4q import rounding

    _, _, cal_path, doc = calibrated
    got = json.loads(run_cli("inspect", cal_path, "--json", "--tensors", "blk.0.attn", check=True).stdout)
    assert got["kind"] == "imatrix" and got["calibration"] == {
        "band": 4096, "weights": doc["weights"], "inputs": doc["inputs"], "tokens": doc["tokens"], "banded_inputs": [],
        "sketched_inputs": [], "factored_inputs": sorted(calibration.load(cal_path).factors),
        "factor_settings": {"damp": rounding.DAMP, "shrink": rounding.SHRINK}}
    k = next(e for e in got["entries"] if e["name"] == "blk.0.attn_k.weight")
    assert k["covariance_of"] == "blk.0.attn_q.weight" and k["width"] == 128 and k["offband_share"] == 0
    assert k["band"] == 128 and k["sketch"] is None
    table = run_cli("inspect", cal_path, check=True).stdout
    assert "calibration" in table and "sketched" in table and "--damp 0.01 --shrink 0.5" in table


@pytest.mark.parametrize("phase", ["collecting", "writing"])
def test_ctrl_c_stops_calibrate_and_leaves_nothing(calibrated, tmp_path, phase):
    import signal
    import subprocess
    import sys

    src, _, _, _ = calibrated
    text = tmp_path / "long.txt"
    text.write_text(TEXT * 40)
    out = tmp_path / "c.gguf"
    source = ["--text", text] if phase == "collecting" else ["--generate", 10_000]  # chunks the model writes
    proc = subprocess.Popen([sys.executable, "-m", "nvfp4q", "calibrate", src, *map(str, source), "-o", out,
                             "--ctx", str(CTX)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()  # a progress line: it is collecting, or writing
        assert first.startswith("nvfp4q: chunk 1/" if phase == "collecting" else "nvfp4q: chunk 32/10000"), first
        assert first.rstrip().endswith("written by the model") == (phase == "writing")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # reading on: progress lines must not fill the pipe
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "nvfp4q: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.txt"]


def test_experts_get_their_routed_rows_and_quantize_runs(tmp_path):
    """MUL_MAT_ID: per expert, the rows routed to it. Independent check: every token reaches
    experts_used experts, so the experts' sums of x^2 add up to experts_used times the router's
    (ffn_gate_inp reads the same x, as a plain matrix product)."""
    from scripts.make_synthetic_model import PRESETS, write

    shape = PRESETS["tiny-moe"]
    src = write(tmp_path / "moe-f16.gguf", shape)[0]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cal_path = tmp_path / "moe.cal.gguf"
    run_cli("calibrate", src, "--text", text, "-o", cal_path, "--ctx", CTX, "-q", check=True)
    cal, raw = calibration.load(cal_path), tensors(cal_path)
    for layer in range(shape.layers):
        experts = f"blk.{layer}.ffn_gate_exps.weight"
        router = cal.for_weight(f"blk.{layer}.ffn_gate_inp.weight")
        assert experts not in cal.sources  # experts: the diagonal only
        counts = np.asarray(raw[experts + ".counts"].data).reshape(-1)
        assert counts.shape == (shape.experts,) and counts.sum() == shape.experts_used * router.count
        sums = np.asarray(raw[experts + ".in_sum2"].data).sum(axis=0)
        router_diag = cal.imatrix.entries[f"blk.{layer}.ffn_gate_inp.weight"].values[0] * np.float32(router.count)
        assert np.allclose(sums, shape.experts_used * router_diag, rtol=1e-4)
    out = tmp_path / "moe-nvfp4.gguf"
    run_cli("quantize", src, out, "--calibration", cal_path, "-q", check=True)
    assert rel_rmse(logits(out), logits(src)) < 0.2
