"""Fit nvfp4q.damage.SENSITIVITY from single-group ablations, and check it on composite files.

    python scripts/fit_sensitivity.py MODEL-f16.gguf IMATRIX EVAL.json [EVAL.json ...]

Each EVAL.json is `nvfp4q eval --json` of MODEL against files that are the model with one group
of tensors quantized (e.g. `--tensor-type ffn_down=nvfp4 --tensor-type .=f16`, the default
method) or any other mix. For each file the script reads its tensor types, adds up every
tensor's relative error for that type (measured as the allocator measures it, on the source and
the imatrix) per tensor kind, in the units of damage.sensitivity (block kinds divided by the
number of blocks), and prints:
- per file whose quantized tensors are all of one kind: the measured KLD over that sum (with
  the depth factor and the activation floor), the sensitivity of the kind;
- per file: the KLD predicted with damage.SENSITIVITY next to the measured one (+- s.e.).
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


from nvfp4q import damage, gguf_header, gguf_io, imatrix, plan
from nvfp4q.convert import tensor_errors
from nvfp4q.quantize import Settings


def relative_errors(model_path: Path, imatrix_path: Path) -> dict[str, dict[str, float]]:
    model = gguf_io.open_model(model_path)
    imat = imatrix.load(imatrix_path)
    out = {}
    for t in model.tensors:
        info = t.info
        if plan.allows_quantization(info.name, len(info.shape), model.arch, plan.Options()):
            entry = imatrix.for_tensor(imat, info.name, info.shape) if info.name in imat.entries else None
            err = tensor_errors(t, entry, [q for q in plan.candidates(info) if q != info.type], Settings())
            out[info.name] = {q.name: e for q, e in err.items()}  # JSON-ready keys
    return out


def damages(path: str, errors: dict[str, dict[str, float]], blocks: int) -> dict[str, tuple[float, float]]:
    """Per kind: (predicted KLD, the same with every sensitivity 1) of the file's tensors."""
    h = gguf_header.read(Path(path))
    out = defaultdict(lambda: (0.0, 0.0))
    for t in h.tensors:
        e = errors.get(t.name, {}).get(t.type_name)
        if e is not None:
            k = damage.kind(t.name)
            d = damage.estimate(t.name, blocks, {t.type: e}, None)[t.type]
            p, u = out[k]
            out[k] = (p + d, u + d / damage.SENSITIVITY.get(k, 1.0))
    return dict(out)


def main() -> None:
    model, imat_path, *evals = sys.argv[1:]
    errors = relative_errors(Path(model), Path(imat_path))
    blocks = damage.n_blocks(list(errors))
    for ev in evals:
        doc = json.loads(Path(ev).read_text())
        print(f"# {ev} ({doc['text']}, {doc['chunks']} chunks)")
        print(f"{'file':40} {'KLD':>8} {'s.e.':>7} {'predicted':>9}  kinds: fitted sensitivity")
        for m in doc["models"]:
            d = damages(m["path"], errors, blocks)
            kld = m["kld"]["mean"]
            predicted = sum(p for p, _ in d.values())
            fitted = ", ".join(f"{k} {kld / u:.3g}" for k, (_, u) in d.items()) if len(d) == 1 else ""
            print(f"{Path(m['path']).name:40} {kld:8.4f} {m['kld']['se']:7.4f} {predicted:9.4f}  {fitted}")

if __name__ == "__main__":
    main()
