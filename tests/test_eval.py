"""nvfp4q eval, checked against llama.cpp's own full-logits evaluation and numpy."""

import json

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from helpers import run_cli, tiny_model
from nvfp4q import divergence
from scripts.make_synthetic_model import WORDS

CTX = 64


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS + ["and", "the", "of"], 600)) + "\n")
    return path


def eval_json(*args) -> dict:
    proc = run_cli("eval", *args, "--ctx", CTX, "--json", check=True)
    return json.loads(proc.stdout)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference(path, text, chunks):
    """Per-token log-probabilities of the scored halves, from llama-cpp-python's own
    all-logits evaluation (not the batch code under test), in float64 numpy. Flash attention on,
    as llama-perplexity's `auto` resolves on a CPU (the binding's default, off, gives other logits)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, verbose=False, n_threads=2,
                          flash_attn=True)
    # as llama-perplexity: the file without its final newline, BOS first (the tiny model adds one)
    tokens = llm.tokenize(text.read_text().removesuffix("\n").encode(), add_bos=True)
    out = []
    for c in range(chunks):
        chunk = [llm.token_bos()] + tokens[c * CTX + 1:(c + 1) * CTX]
        llm.reset()
        llm.eval(chunk)
        lp = log_softmax(np.array(llm.scores[:CTX], np.float64))
        out.append((lp[CTX // 2:-1], np.array(chunk[CTX // 2 + 1:])))
    llm.close()
    return out


def test_a_file_against_itself_is_identical(tiny, text):
    src, _ = tiny
    doc = eval_json(src, src, "--text", text)
    m = doc["models"][0]
    assert m["kld"]["mean"] == 0 and m["kld"]["p99"] == 0
    assert m["ppl_ratio"]["value"] == 1 and m["same_top1"]["value"] == 1
    assert m["ppl"]["value"] == doc["base"]["ppl"]["value"]


def test_json_fields_match_an_independent_computation(tiny, text):
    src, outs = tiny
    doc = eval_json(src, outs[0], outs[12], "--text", text, "--chunks", 3)
    assert doc["schema"] == "nvfp4q.eval/1"
    assert (doc["ctx"], doc["chunks"], doc["scored_tokens"]) == (CTX, 3, 3 * (CTX // 2 - 1))
    assert doc["base"]["path"] == str(src) and doc["text"] == str(text) and doc["seconds"] > 0
    base = reference(src, text, 3)
    nll_b = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in base])
    assert doc["base"]["ppl"]["value"] == pytest.approx(np.exp(nll_b.mean()), rel=1e-9)
    for m, path in zip(doc["models"], (outs[0], outs[12])):
        assert m["path"] == str(path)
        size = path.stat().st_size
        assert m["bytes"] == size
        params = sum(int(np.prod(t.shape)) for t in GGUFReader(path).tensors)
        assert (m["parameters"], m["bits_per_weight"]) == (params, pytest.approx(8 * size / params))
        q = reference(path, text, 3)
        nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in q])
        kld = np.concatenate([(np.exp(b) * (b - lq)).sum(axis=1) for (b, _), (lq, _) in zip(base, q)])
        top1 = np.concatenate([b.argmax(axis=1) == lq.argmax(axis=1) for (b, _), (lq, _) in zip(base, q)])
        assert m["kld"]["mean"] > 0.001
        assert m["kld"]["mean"] == pytest.approx(kld.mean(), rel=1e-6)
        assert m["kld"]["se"] == pytest.approx(kld.std(ddof=1) / np.sqrt(kld.size), rel=1e-5)
        assert m["kld"]["median"] == pytest.approx(np.median(kld), rel=1e-6, abs=1e-12)
        assert m["kld"]["p99"] == pytest.approx(np.percentile(kld, 99), rel=1e-6)
        assert m["kld"]["max"] == pytest.approx(kld.max(), rel=1e-6)
        assert m["ppl"]["value"] == pytest.approx(np.exp(nll.mean()), rel=1e-9)
        ratio = np.exp((nll - nll_b).mean())
        assert m["ppl_ratio"]["value"] == pytest.approx(ratio, rel=1e-9)
        assert m["ppl_ratio"]["se"] == pytest.approx(ratio * (nll - nll_b).std(ddof=1) / np.sqrt(nll.size), rel=1e-6)
        assert m["same_top1"]["value"] == pytest.approx(top1.mean())
    assert "paired" not in doc


def test_paired_difference(tiny, text):
    src, outs = tiny
    doc = eval_json(src, outs[0], outs[12], outs[0], "--text", text, "--chunks", 2, "--paired")
    a, b, again = doc["models"]
    vs_b, vs_self = doc["paired"]
    assert (vs_b["a"], vs_b["b"]) == (str(outs[0]), str(outs[12]))
    assert vs_b["kld"]["mean"] == pytest.approx(b["kld"]["mean"] - a["kld"]["mean"], abs=1e-12)
    assert vs_b["nll"]["mean"] == pytest.approx(np.log(b["ppl"]["value"] / a["ppl"]["value"]), abs=1e-9)
    assert vs_b["kld"]["se"] > 0 and vs_b["kld"]["se_chunks"] > 0
    assert vs_self["kld"] == {"mean": 0, "se": 0, "se_chunks": 0} and vs_self["nll"]["mean"] == 0


def test_table_output(tiny, text):
    src, outs = tiny
    proc = run_cli("eval", src, outs[12], outs[0], "--text", text, "--ctx", CTX, "--chunks", 2, "--paired", check=True)
    assert str(outs[12]) in proc.stdout and "mean KLD" in proc.stdout and "paired" in proc.stdout
    assert "chunk 2/2" in proc.stderr  # progress lines when stderr is not a terminal


def test_vocabulary_mismatch_is_an_error(tiny, text, tmp_path):
    src, _ = tiny
    other = tiny_model(tmp_path, vocab_size=384)
    proc = run_cli("eval", src, other, "--text", text, "--ctx", CTX)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"nvfp4q: error: {other}: vocabulary of 384 tokens, the base has 320: not the same model"]


def test_tokenizer_mismatch_is_an_error(tiny, text, tmp_path):
    src, _ = tiny
    r = GGUFReader(src)
    dst = tmp_path / "renamed-tokens.gguf"
    w = GGUFWriter(dst, r.get_field("general.architecture").contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        value = f.contents()
        if f.name == "tokenizer.ggml.tokens":  # same size, the words' pieces reversed
            value = value[:259] + value[259:][::-1]
        vtype = GGUFValueType(f.types[0])
        w.add_key_value(f.name, value, vtype, GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(reversed([int(d) for d in t.shape])),
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = run_cli("eval", src, dst, "--text", text, "--ctx", CTX)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"nvfp4q: error: {dst}: tokenizes the text differently from the base: not the same model"]


@pytest.mark.parametrize("case", ["short text", "not gguf", "missing"])
def test_bad_input_is_one_line(tiny, text, tmp_path, case):
    src, outs = tiny
    args = {"short text": (src, outs[0], "--text", tmp_path / "short.txt"),
            "not gguf": (src, text, "--text", text),
            "missing": (src, tmp_path / "none.gguf", "--text", text)}[case]
    (tmp_path / "short.txt").write_text("the end")
    proc = run_cli("eval", *args, "--ctx", CTX)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvfp4q: error: "), proc.stderr
    assert {"short text": "too short", "not gguf": "not a GGUF", "missing": "no such file"}[case] in lines[0]


def test_missing_extra_is_one_line(tiny, text, tmp_path):
    src, outs = tiny
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('llama_cpp is not installed')\n")
    import os

    proc = run_cli("eval", src, outs[0], "--text", text,
                   env={"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "nvfp4q: error: nvfp4q eval needs llama-cpp-python 0.3.36 (stock llama.cpp): pip install 'nvfp4q[eval]'"]


def test_divergence_kernels_equal_numpy():
    rng = np.random.default_rng(3)
    base = (rng.standard_normal((37, 1000)) * 4).astype(np.float32)
    quant = (base + rng.standard_normal(base.shape).astype(np.float32)).astype(np.float32)
    targets = rng.integers(0, 1000, 37)
    fb, fq = divergence.softmax_facts(base, targets), divergence.softmax_facts(quant, targets)
    lb, lq = log_softmax(base.astype(np.float64)), log_softmax(quant.astype(np.float64))
    np.testing.assert_allclose(fq.nll, -lq[np.arange(37), targets], rtol=1e-12)
    np.testing.assert_array_equal(fb.argmax, base.argmax(axis=1))
    np.testing.assert_allclose(divergence.kld(base, fb, quant, fq), (np.exp(lb) * (lb - lq)).sum(axis=1), rtol=1e-10)


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_usage_errors_are_one_line(command):
    proc = run_cli(command, "--no-such-option")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["nvfp4q: error: No such option: --no-such-option"]
