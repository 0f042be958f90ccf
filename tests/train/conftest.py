"""Fixtures of the training-command tests."""
import pytest


@pytest.fixture
def corpus(tmp_path):
    """A small Python-like text file to train the byte LM on."""
    path = tmp_path / "corpus.py"
    path.write_text("def f(x):\n    # add one\n    return x + 1  # 'quoted'\n" * 60)
    return path
