"""nvfp4q inspect: the facts about a model GGUF or an imatrix file, as one JSON-ready dict.

Describing reads headers only (gguf_header), so it is instant on a multi-GB file. --verify
and --against decode tensors; they live in nvfp4q.verify and are imported only when asked
for, so the plain path never loads numba. docs/inspect-json.md is the schema of the dict.
"""

import math
import re
from collections import defaultdict
from pathlib import Path

from nvfp4q import gguf_header
from nvfp4q.errors import UserError

SCHEMA = "nvfp4q.inspect/1"
PROVENANCE_PREFIXES = ("quantize.imatrix.", "nvfp4q.")


def describe(path: Path, tensors_regex: str | None = None, meta: bool = False, verify: bool = False,
             against: Path | None = None, imatrix_path: Path | None = None) -> dict:
    """The document for FILE (schema: docs/inspect-json.md); UserError for unusable input."""
    path = Path(path)
    pattern = _compile(tensors_regex)
    if imatrix_path is not None and against is None:
        raise UserError("--imatrix weights the --against measurement: give --against too")
    decodes = verify or against is not None
    if not gguf_header.is_gguf(path):
        return _imatrix_doc(path, None, pattern, meta, decodes)
    headers = gguf_header.read_parts(path)
    if _is_imatrix(headers[0]):
        return _imatrix_doc(path, headers[0], pattern, meta, decodes)
    doc = _model_doc(path, headers, pattern, meta)
    if decodes:
        from nvfp4q import verify as checks

        if verify:
            doc["verify"] = checks.verify(headers)
        if against is not None:
            doc["against"] = checks.against(headers, Path(against), imatrix_path)
    return doc


def render(doc: dict) -> None:
    from nvfp4q import inspect_view

    inspect_view.render(doc)


def _compile(regex: str | None):
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise UserError(f"--tensors: bad regular expression {regex!r}: {e}") from None


def _is_imatrix(h: gguf_header.Header) -> bool:
    return h.get("general.type") == "imatrix" or any(k.startswith("imatrix.") for k in h.fields)


def _model_doc(path: Path, headers: list[gguf_header.Header], pattern, meta: bool) -> dict:
    first = headers[0]
    tensors = [t for h in headers for t in h.tensors]
    params = sum(t.n_elements for t in tensors)
    size = sum(h.file_size for h in headers)
    doc = {
        "schema": SCHEMA,
        "kind": "model",
        "path": str(path),
        "parts": [str(h.path) for h in headers],
        "gguf_version": first.version,
        "architecture": first.get("general.architecture"),
        "name": first.get("general.name"),
        "file_type": _file_type(first.get("general.file_type")),
        "quantization_version": first.get("general.quantization_version"),
        "alignment": first.alignment,
        "tensor_count": len(tensors),
        "parameters": params,
        "file_size": size,
        "bits_per_weight": 8 * size / params if params else None,
        "types": _type_table(tensors),
        "provenance": {k: json_value(f.value) for k, f in first.fields.items()
                       if k.startswith(PROVENANCE_PREFIXES)},
    }
    if pattern is not None:
        doc["tensors"] = [
            {"name": t.name, "shape": list(t.shape), "type": t.type_name, "bytes": t.nbytes,
             "offset": t.offset, "part": t.part}
            for t in tensors if pattern.search(t.name)
        ]
    if meta:
        doc["metadata"] = metadata(first)
    return doc


def _file_type(value) -> dict | None:
    if value is None:
        return None
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(value).name
    except ValueError:
        name = None
    return {"id": int(value), "name": name}


def _type_table(tensors: list[gguf_header.Tensor]) -> list[dict]:
    rows = defaultdict(lambda: {"count": 0, "parameters": 0, "bytes": 0})
    for t in tensors:
        row = rows[t.type_name]
        row["count"] += 1
        row["parameters"] += t.n_elements
        row["bytes"] += t.nbytes or 0
    total = sum(r["bytes"] for r in rows.values())
    table = [{"type": k, **r, "share": r["bytes"] / total if total else 0.0} for k, r in rows.items()]
    return sorted(table, key=lambda r: (-r["bytes"], r["type"]))


def metadata(h: gguf_header.Header) -> list[dict]:
    """Every key in file order; arrays longer than HEAD_ITEMS are summarised by their head."""
    out = []
    for f in h.fields.values():
        entry = {"key": f.key, "type": f.type.name}
        if isinstance(f.value, gguf_header.Array):
            entry.update(_array_json(f.value))
        else:
            entry["value"] = json_value(f.value)
        out.append(entry)
    return out


def _array_json(a: gguf_header.Array) -> dict:
    items = [json_value(v) for v in a.head]
    return {"item_type": a.item_type.name, "length": a.length, "value" if a.complete else "head": items}


def json_value(v):
    """A metadata value as JSON allows: non-finite floats as strings, arrays as summaries."""
    if isinstance(v, gguf_header.Array):
        return [json_value(x) for x in v.head] if v.complete else _array_json(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _calibration(path: Path, header: gguf_header.Header | None):
    from nvfp4q import calibration

    if header is None or calibration.KEY_WEIGHTS not in header.fields:
        return None
    return calibration.load(path)


def _moments_entry(cal, name: str) -> dict:
    from nvfp4q import calibration

    src = cal.sources[name]
    m = cal.moments[src]
    sketch = isinstance(m, calibration.Sketch)
    return {"covariance_of": src, "width": m.width, "band": None if sketch else m.band,
            "sketch": m.max_rank if sketch else None, "offband_share": m.offband}


def _imatrix_doc(path: Path, header: gguf_header.Header | None, pattern, meta: bool, decodes: bool) -> dict:
    """An imatrix file (header None: not GGUF, so legacy .dat) read as quantize would read it."""
    from nvfp4q import imatrix
    from nvfp4q.calibration import Moments, Sketch

    if decodes:
        raise UserError(f"{path}: --verify and --against apply to model files, this is an imatrix")
    try:
        imat = imatrix.load(path)
    except UserError:
        if header is not None:
            raise
        raise UserError(f"{path}: not a GGUF file, nor a legacy imatrix") from None
    doc = {
        "schema": SCHEMA,
        "kind": "imatrix",
        "path": str(path),
        "file_size": path.stat().st_size,
        "format": imat.format,
        "entry_count": len(imat.entries),
        "chunk_count": imat.chunk_count,
        "chunk_size": imat.chunk_size if imat.format == "gguf" else None,
        "datasets": list(imat.datasets),
    }
    cal = _calibration(path, header)
    if cal is not None:
        sketched = [n for n, m in cal.moments.items() if isinstance(m, Sketch)]
        doc["calibration"] = {
            "band": cal.band, "weights": len(cal.sources), "inputs": len(cal.moments),
            "tokens": int(max((m.count for m in cal.moments.values()), default=0)),
            "banded_inputs": [n for n, m in cal.moments.items() if isinstance(m, Moments) and not m.whole],
            "sketched_inputs": sketched,
            "factored_inputs": sorted(cal.factors),
            "factor_settings": None if cal.factor_settings is None else dict(zip(("damp", "shrink"), cal.factor_settings)),
        }
    if pattern is not None:
        doc["entries"] = [
            {"name": name, "length": int(e.values.size), "matrices": int(e.values.shape[0]),
             "unseen": int((~e.seen).sum()), "min": float(e.values.min()), "max": float(e.values.max()),
             **({} if cal is None or name not in cal.sources else _moments_entry(cal, name))}
            for name, e in imat.entries.items() if pattern.search(name)
        ]
    if meta:
        doc["metadata"] = metadata(header) if header is not None else []
    return doc
