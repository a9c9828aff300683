"""The worked example ``examples/digits_batch.py``: a scikit-learn model behind ``POST /predict``
with a sync ``@serve.batch`` method, served in process (a small forest, so that it is quick)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from aioserve import Serve
from examples.digits_batch import setup

pytestmark = pytest.mark.usefixtures("no_loop_errors")


def _batch_totals(text: str) -> tuple[float, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels == {"backend": "digits", "method": "predict"} and sample.name in (
                "aioserve_batch_size_sum",
                "aioserve_batch_size_count",
            ):
                found[sample.name] = sample.value
    return found["aioserve_batch_size_sum"], found["aioserve_batch_size_count"]


async def test_the_digits_example_labels_images_in_batches(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await setup(serve, n_estimators=5)
    digits = load_digits()
    images = [[float(p) for p in row] for row in digits.data[:40]]

    one = await http.post("/predict", json={"pixels": images[0]})
    assert one.status_code == 200
    assert one.json() == {"label": int(digits.target[0])}

    answers = await asyncio.gather(*(http.post("/predict", json={"pixels": p}) for p in images))
    labels = [r.json()["label"] for r in answers]
    # The forest was trained on these very images: it knows nearly all of them.
    assert sum(a == b for a, b in zip(labels, digits.target[:40], strict=True)) >= 36

    metrics = await http.get("/-/metrics")
    items, batches = _batch_totals(metrics.text)
    assert items == 41
    assert batches < 41  # concurrent requests shared batches


@pytest.mark.parametrize(
    "body",
    [{"pixels": [1.0] * 63}, {"pixels": ["x"] * 64}, {"image": [0] * 64}, [0] * 64],
)
async def test_the_digits_example_refuses_a_malformed_image(
    serve: Serve, http: httpx.AsyncClient, body: object
) -> None:
    await setup(serve, n_estimators=1)
    response = await http.post("/predict", json=body)
    assert response.status_code == 400
    assert "64 numbers" in response.json()["error"]
