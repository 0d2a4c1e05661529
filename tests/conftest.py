import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# WikiText-2 lives beside the repository (../shared/data); a clone elsewhere (CI's clean clone)
# finds it through $EDGEPRUNE_SHARED_DATA or this machine's shared folder.
_DATA_CANDIDATES = [Path(p) for p in (os.environ.get("EDGEPRUNE_SHARED_DATA"),) if p] + [
    REPO.parent / "shared" / "data", Path("/work/shared/data")]
SHARED_DATA = next((d for d in _DATA_CANDIDATES if (d / "wikitext2-test.raw").is_file()), _DATA_CANDIDATES[0])


@pytest.fixture
def one_torch_thread():
    """torch on one thread, as llama.cpp runs in the GGUF tests (comparable, and kinder to 2 cores)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp  # a hard dependency: a broken install fails here instead of skipping

    return llama_cpp


@pytest.fixture(scope="module")
def tok():
    from edgeprune.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def windows(tok):
    from edgeprune.exporters.common import verification_windows

    return verification_windows(tok, seqlen=128, n=2)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 4-layer random Llama with a real byte-level BPE tokenizer."""
    from edgeprune.testing import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from edgeprune.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=6, ffn=256)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (embedded default), loaded once per test session."""
    from edgeprune.models import load_model

    return load_model(os.environ.get("EDGEPRUNE_TEST_MODEL", "smollm2-135m"))


@pytest.fixture(scope="session")
def wikitext_test():
    path = SHARED_DATA / "wikitext2-test.raw"
    if not path.is_file():
        pytest.skip(f"{path} not present (set EDGEPRUNE_SHARED_DATA to the folder holding WikiText-2)")
    return path


def run_cli(*args, timeout=900, env=None):
    """Run the installed CLI in a subprocess: exit code, stdout, stderr as the user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "edgeprune.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def pytest_collection_modifyitems(config, items):
    """`slow` marks every test that runs the real SmolLM2 (its fixture or the `integration` marker),
    so the edit loop can run `pytest -m "not slow"`; the README's command still runs everything."""
    for item in items:
        if "integration" in item.keywords or "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
