"""Sizes as people read them (no heavy imports: inspect's fast path uses this)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def bits_per_weight(nbytes: int, n_weights: int) -> float:
    return 8 * nbytes / n_weights if n_weights else 0.0
