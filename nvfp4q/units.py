"""Sizes as people read them (no heavy imports: inspect's fast path uses this)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def bits_per_weight(nbytes: int, n_weights: int) -> float:
    return 8 * nbytes / n_weights if n_weights else 0.0


def parse_size(text: str) -> int:
    """'48G', '500M', '1.5G' or bytes, in powers of 1000 as llama.cpp's gguf-split reads them."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    t = text.strip().upper().removesuffix("B")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"bad size '{text}' (e.g. 48G, 500M)") from None
    if n <= 0:
        raise ValueError(f"bad size '{text}'")
    return int(n)
