"""End to end through the CLI, checked by stock llama.cpp (llama-cpp-python 0.3.36)."""

import numpy as np
from gguf import GGMLQuantizationType as T

import ggml_oracle as ggml
from helpers import dequantized_copy, logits, rel_rmse, tensors


def test_search_0_tensors_equal_stock_ggml_bytes(tiny):
    src, outs = tiny
    source, ours = tensors(src), tensors(outs[0])
    checked = {T.NVFP4: 0, T.Q8_0: 0}
    for name, t in ours.items():
        if t.tensor_type not in checked:
            continue
        rows = np.asarray(source[name].data, np.float32).reshape(-1, int(t.shape[0]))
        qtype = ggml.NVFP4 if t.tensor_type == T.NVFP4 else ggml.Q8_0
        assert np.array_equal(np.asarray(t.data).reshape(rows.shape[0], -1), ggml.quantize(qtype, rows)), name
        checked[t.tensor_type] += 1
    assert checked[T.NVFP4] >= 8 and checked[T.Q8_0] >= 2


def test_llama_cpp_reads_our_blocks_as_gguf_decodes_them(tiny, tmp_path):
    # Same model, once as NVFP4 blocks and once as the F32 values gguf's dequantizer reads
    # from them: llama.cpp must compute the same logits up to its own activation rounding
    # (its CPU NVFP4 dot product quantizes activations to 8 bits, ~1-2% here). A wrong nibble
    # order or scale decode gives errors of the order of the logits themselves (> 50%).
    _, outs = tiny
    for out in outs.values():
        assert rel_rmse(logits(dequantized_copy(out, tmp_path / "deq.gguf")), logits(out)) < 0.05


def test_quantized_logits_close_to_f16(tiny):
    # 4.5-bit weights carry ~10% relative error each; through this random, untrained network
    # that grows to ~20% of the logits' spread (measured 0.22 RTN, 0.18 search 12). 0.3 leaves
    # room for platform rounding while failing for any real decoding fault (errors >= 100%).
    src, outs = tiny
    ref = logits(src)
    errors = {s: rel_rmse(ref, logits(out)) for s, out in outs.items()}
    assert all(e < 0.3 for e in errors.values()), errors
    assert errors[12] < errors[0], errors
    top1 = (ref.argmax(axis=1) == logits(outs[12]).argmax(axis=1)).mean()
    assert top1 >= 0.6


def test_output_metadata(tiny):
    from gguf import GGUFReader

    _, outs = tiny
    r = GGUFReader(outs[12])
    assert r.get_field("general.file_type").contents() == 39
    assert r.get_field("general.quantization_version").contents() == 2
    assert r.get_field("nvfp4q.search").contents() == 12
    assert r.get_field("general.name").contents() == "nvfp4q synthetic llama"
    assert len(r.get_field("tokenizer.ggml.tokens").contents()) == 320


def test_q5_tensors_are_stock_ggml_bytes_and_run(tmp_path):
    from helpers import run_cli, tiny_model

    src = tiny_model(tmp_path / "m")
    out = tmp_path / "q5.gguf"
    run_cli("quantize", src, out, "--tensor-type", "attn_q=q5_0", "--tensor-type", "ffn_up=q5_1",
            "--token-embedding-type", "q5_1", "-q", check=True)
    source, ours = tensors(src), tensors(out)
    checked = {T.Q5_0: 0, T.Q5_1: 0}
    for name, t in ours.items():
        if t.tensor_type in checked:
            rows = np.asarray(source[name].data, np.float32).reshape(-1, int(t.shape[0]))
            qtype = ggml.Q5_0 if t.tensor_type == T.Q5_0 else ggml.Q5_1
            assert np.array_equal(np.asarray(t.data).reshape(rows.shape[0], -1), ggml.quantize(qtype, rows)), name
            checked[t.tensor_type] += 1
    assert checked[T.Q5_0] >= 2 and checked[T.Q5_1] >= 3
    assert run_cli("inspect", out, "--verify").returncode == 0
    assert rel_rmse(logits(src), logits(out)) < 0.3
