"""Human output of inspect: the describe() dict as rich tables (plain text when not a TTY)."""

import sys

from rich.console import Console
from rich.table import Table

from nvfp4q.units import human_bytes


def _pct(share: float) -> str:
    return f"{100 * share:.2f}%"


def _num(v, fmt: str = "{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def _value(v) -> str:
    if isinstance(v, dict) and "length" in v:  # a long array summarised by its head
        head = ", ".join(map(repr, v["head"]))
        return f"[{v['item_type']} x {v['length']}] [{head}, ...]"
    return repr(v) if isinstance(v, str) else str(v)


def _table(console: Console, title: str | None, columns: str, rows, numeric: str = "") -> None:
    """A borderless table; columns is space-separated, those listed in numeric right-aligned."""
    table = Table(box=None, pad_edge=False, title=title, title_justify="left", title_style="bold")
    for col in columns.split():
        table.add_column(col.replace("_", " "), justify="right" if col in numeric.split() else "left")
    for row in rows:
        table.add_row(*map(str, row))
    console.print(table)


def _facts(console: Console, facts: list[tuple[str, object]]) -> None:
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in facts:
        table.add_row(k, str(v))
    console.print(table)


def render(doc: dict) -> None:
    tty = sys.stdout.isatty()
    # markup off: token strings such as "[multimodal]" are data, not rich markup
    opts = dict(soft_wrap=True, markup=False, highlight=False)
    console = Console(**opts) if tty else Console(width=200, no_color=True, **opts)
    (_model if doc["kind"] == "model" else _imatrix)(console, doc)
    if "metadata" in doc:
        _table(console, "metadata", "key type value",
               ((m["key"], m.get("item_type", m["type"]) + ("[]" if "length" in m else ""),
                 _value(m if "head" in m else m["value"])) for m in doc["metadata"]))


def _model(console: Console, doc: dict) -> None:
    ft = doc["file_type"]
    parts = len(doc["parts"])
    _facts(console, [
        ("file", doc["path"] + (f" ({parts} parts)" if parts > 1 else "")),
        ("architecture", doc["architecture"]),
        ("name", doc["name"]),
        ("file type", "-" if ft is None else f"{ft['name'] or 'unknown'} ({ft['id']})"),
        ("quantization version", _num(doc["quantization_version"], "{}")),
        ("tensors", doc["tensor_count"]),
        ("parameters", f"{doc['parameters']:,}"),
        ("file size", f"{human_bytes(doc['file_size'])} ({doc['file_size']:,} bytes)"),
        ("bits per weight", _num(doc["bits_per_weight"], "{:.3f}")),
    ])
    _table(console, None, "type tensors parameters bytes share", (
        (r["type"], r["count"], f"{r['parameters']:,}", human_bytes(r["bytes"]), _pct(r["share"]))
        for r in doc["types"]), numeric="tensors parameters bytes share")
    if doc["provenance"]:
        _table(console, "quantization keys", "key value",
               ((k, _value(v)) for k, v in doc["provenance"].items()))
    if "tensors" in doc:
        _table(console, "tensors", "name shape type bytes", (
            (t["name"], "x".join(map(str, t["shape"])), t["type"], _num(t["bytes"], "{:,}"))
            for t in doc["tensors"]), numeric="bytes")
    if "verify" in doc:
        _verify(console, doc["verify"])
    if "against" in doc:
        _against(console, doc["against"])


def _verify(console: Console, v: dict) -> None:
    problems = v["problems"]
    console.print(f"verify: {v['tensors_checked']} of {v['tensor_count']} tensors decoded, "
                  f"{len(problems)} problem(s)")
    s = v["nvfp4_scales"]
    if s:
        console.print(f"NVFP4 scale codes: {s['codes']:,}: normal {_pct(s['normal_share'])}, "
                      f"subnormal {_pct(s['subnormal_share'])}, zero {_pct(s['zero_share'])}, "
                      f"invalid {s['invalid']}")
    if problems:
        _table(console, "problems", "tensor problem", ((p["tensor"], p["problem"]) for p in problems))


def _against(console: Console, a: dict) -> None:
    weighted = f", weighted by {a['imatrix']}" if a["imatrix"] else ""
    total = a["total"]
    console.print(f"against {a['source']}{weighted}: {a['compared']} tensors compared, "
                  f"{len(a['skipped'])} skipped")
    _table(console, None, "tensor type from rel_RMSE SNR_dB imatrix", (
        (r["name"], r["type"], r["source_type"], _num(r["rel_rmse"]), _snr(r),
         "yes" if r["weighted"] else "-") for r in a["tensors"]), numeric="rel_RMSE SNR_dB")
    console.print(f"total: relative RMSE {_num(total['rel_rmse'])}, SNR {_snr(total)} dB")


def _snr(r: dict) -> str:
    """null SNR means infinite when the error is 0 (identical), undefined otherwise."""
    return "inf" if r["snr_db"] is None and r["rel_rmse"] == 0 else _num(r["snr_db"], "{:.2f}")


def _imatrix(console: Console, doc: dict) -> None:
    _facts(console, [
        ("file", doc["path"]),
        ("format", "GGUF imatrix" if doc["format"] == "gguf" else "legacy .dat imatrix"),
        ("file size", human_bytes(doc["file_size"])),
        ("entries", doc["entry_count"]),
        ("chunks", doc["chunk_count"]),
        ("chunk size", _num(doc["chunk_size"], "{}")),
        ("datasets", ", ".join(doc["datasets"]) or "-"),
    ])
    if "calibration" in doc:
        c = doc["calibration"]
        _facts(console, [
            ("calibration", f"input covariances of {c['inputs']} inputs, for {c['weights']} weights"),
            ("tokens", c["tokens"]),
            ("band", c["band"]),
            ("banded", ", ".join(c["banded_inputs"]) or "none"),
            ("sketched", ", ".join(c["sketched_inputs"]) or "none"),
            ("rounding factors", f"{len(c['factored_inputs'])} inputs, for --damp {c['factor_settings']['damp']:g} "
                                 f"--shrink {c['factor_settings']['shrink']:g}" if c["factor_settings"] else "none"),
        ])
    if "entries" in doc:
        _table(console, "entries", "name length matrices unseen min max", (
            (e["name"], e["length"], e["matrices"], e["unseen"], f"{e['min']:.4g}", f"{e['max']:.4g}")
            for e in doc["entries"]), numeric="length matrices unseen min max")
