"""Session fixtures: the loaded chart and every valid value set rendered once."""

import pytest
from chart_render import CHART_DIR, VALUE_SETS, load_values, render_docs

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) is not installed")


@pytest.fixture(scope="session")
def chart():
    loaded = helm.Chart.load(CHART_DIR)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def rendered(chart) -> dict[str, list[dict]]:
    """{value set name: rendered objects} for every valid value set."""
    return {name: render_docs(chart, load_values(name)) for name in VALUE_SETS}
