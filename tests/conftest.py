import pytest

from helpers import run_cli, tiny_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny llama f16 model and its quantizations at --search 0 and 12, shared by the tests."""
    folder = tmp_path_factory.mktemp("tiny")
    src = tiny_model(folder)
    outs = {}
    for search in (0, 12):
        outs[search] = folder / f"search{search}.gguf"
        run_cli("quantize", src, outs[search], "--search", search, "-q", check=True)
    return src, outs
