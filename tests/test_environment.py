import os

import pytest

from evolver.environment import restored_environment


def test_variables_get_their_values_back_and_new_ones_go_even_after_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVOLVER_TEST_KEPT", "before")
    monkeypatch.delenv("EVOLVER_TEST_ADDED", raising=False)
    with (
        pytest.raises(RuntimeError),
        restored_environment(["EVOLVER_TEST_KEPT", "EVOLVER_TEST_ADDED"]),
    ):
        os.environ["EVOLVER_TEST_KEPT"] = "during"
        os.environ["EVOLVER_TEST_ADDED"] = "during"
        raise RuntimeError("the block fails")
    assert os.environ["EVOLVER_TEST_KEPT"] == "before"
    assert "EVOLVER_TEST_ADDED" not in os.environ
