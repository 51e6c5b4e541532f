"""calibrate --generate: chunks the model writes itself, sampled in stock llama.cpp."""

import json

import numpy as np
import pytest

from helpers import run_cli, tiny_model
from nvfp4q import calibration, evaluation, synthetic
from test_calibrate import CTX, TEXT, one_error_line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("synthetic"))


def test_draw_follows_the_probabilities():
    p = np.array([0.5, 0.3, 0.2, 0.0])
    logits = np.log(np.maximum(p, 1e-30))[None].repeat(40000, axis=0).astype(np.float32) + 7.0
    picks = synthetic.draw(logits, np.random.default_rng(3).random(len(logits)))
    share = np.bincount(picks, minlength=4) / len(picks)
    assert np.all(np.abs(share - p) <= 4 * np.sqrt(p * (1 - p) / len(picks)) + 1e-12)
    # the inverse CDF at its edges: u = 0 is the first token, u just below 1 the last possible one
    assert list(synthetic.draw(logits[:2], np.array([0.0, 1 - 1e-12]))) == [0, 2]


def test_draw_equals_the_inverse_cdf_by_its_definition():
    """The kernel against the sampling written out in NumPy: the CDF's cumulative sum and the
    count of its entries not above u times the total; ties, -inf logits (never drawn, even at
    u = 0) and a 262k vocabulary."""
    def plain(logits, u):
        p = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(p, axis=1)
        return np.minimum((cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1), logits.shape[1] - 1)

    rng = np.random.default_rng(11)
    for vocab, spread in ((5, 1.0), (49152, 4.0), (262144, 8.0)):
        logits = np.repeat(rng.standard_normal((32, vocab // 2 + 1)) * spread, 2, axis=1)[:, :vocab]
        logits = logits.astype(np.float32)  # in equal pairs: ties in p
        logits[:4, :vocab // 2] = -np.inf  # masked tokens are never drawn
        u = rng.random(32)
        u[:2] = (0.0, 1 - 1e-12)
        got = synthetic.draw(logits, u)
        assert np.array_equal(got, plain(logits, u)) and np.all(got[:4] >= vocab // 2)


def test_chunks_are_samples_of_the_model_at_temperature_one(model):
    chunks = synthetic.write(model, 40, CTX, 2, seed=0)
    runner = evaluation.Runner(model, CTX, 2)
    try:
        starts = set(synthetic.starts(runner))
        assert len(chunks) == 40 and all(len(c) == CTX for c in chunks)
        assert all(c[0] == runner.llm.token_bos() and c[1] in starts for c in chunks) and runner.add_bos
        assert len({c[1] for c in chunks}) > min(20, len(starts) // 2)  # the random starts differ
        sampled, entropy, uniform = [], [], []
        for c in chunks:
            lp = runner.logits(c, 1).astype(np.float64)  # the logits that chose c[2:]
            lp -= lp.max(axis=1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
            sampled += list(lp[np.arange(len(lp)), c[2:]])
            entropy += list((np.exp(lp) * lp).sum(axis=1))
            uniform += list(lp.mean(axis=1))
    finally:
        runner.close()
    # tokens drawn from p have E[log p(token)] = -H(p) at every position: greedy picks sit above
    # it, random ones far below
    gap = np.array(sampled) - np.array(entropy)
    assert abs(gap.mean()) < 4 * gap.std() / np.sqrt(len(gap))
    assert np.mean(sampled) - np.mean(uniform) > 5


def test_same_chunks_for_a_seed_whatever_the_thread_count(model):
    one = synthetic.write(model, 33, CTX, 1, seed=5)  # 33: two rounds of sequences, the second of one
    assert synthetic.write(model, 33, CTX, 2, seed=5) == one
    assert synthetic.write(model, 33, CTX, 2, seed=6) != one


def test_generated_chunks_add_to_the_text_s_covariances(model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT + "\n")
    files = {}
    for name, args in {"text": ["--text", text], "gen": ["--generate", 9, "--seed", 2],
                       "both": ["--text", text, "--generate", 9, "--seed", 2]}.items():
        files[name] = tmp_path / f"{name}.cal.gguf"
        doc = json.loads(run_cli("calibrate", model, "-o", files[name], "--ctx", CTX, "--json", *args,
                                 check=True).stdout)
        files[name] = (calibration.load(files[name]), doc)
    (t, dt), (g, dg), (b, db) = files["text"], files["gen"], files["both"]
    assert dg["chunks"] == 9 and db["chunks"] == dt["chunks"] + 9
    assert b.imatrix.chunk_count == db["chunks"]
    for w in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        want = t.for_weight(w).blocks + g.for_weight(w).blocks
        assert np.allclose(b.for_weight(w).blocks, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        assert not np.allclose(g.for_weight(w).blocks, t.for_weight(w).blocks * 9 / dt["chunks"], rtol=0.05)
    got = json.loads(run_cli("inspect", tmp_path / "both.cal.gguf", "--json", check=True).stdout)
    assert got["datasets"] == ["text.txt", f"{synthetic.DATASET}, seed 2"]


def test_calibrate_needs_a_text_or_generated_chunks(model, tmp_path):
    line = one_error_line(run_cli("calibrate", model, "-o", tmp_path / "c.gguf"))
    assert "--text" in line and "--generate" in line
    assert not (tmp_path / "c.gguf").exists()
