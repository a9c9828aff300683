"""The worked example ``examples/digits``, run for real: its deployment behind uvicorn on
127.0.0.1, the same deployment from its TOML file under ``aioserve run``, and its FastAPI app.

The models are the example's own (20 and 30 trees): small enough to train in a fraction of a
second. Answers are checked against the data set's labels, not against hard-coded ones.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from _processes import Running
from _servers import run_uvicorn
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits
from starlette.exceptions import HTTPException

from aioserve import Serve
from aioserve.deployment import load_deployment
from aioserve.exceptions import MethodNotFound
from examples.digits import client
from examples.digits.deployment import TRAFFIC, setup
from examples.digits.fastapi_app import create_app
from examples.digits.model import MODEL_ENDPOINT

pytestmark = pytest.mark.usefixtures("no_loop_errors")

TOML = "examples/digits/deployment.toml"
# Building the deployment trains two forests: seconds on a busy 2-core machine under coverage.
STARTUP_S = 60.0
V2_SHARE = TRAFFIC["digits-v2"]


def known_images(n: int = 20) -> list[tuple[list[float], int]]:
    """``n`` images the models were trained on (every fifth image is held out) and labels."""
    digits = load_digits()
    kept = [i for i in range(len(digits.target)) if i % 5 != 4][:n]
    return [([float(p) for p in digits.data[i]], int(digits.target[i])) for i in kept]


def accuracy(answers: list[dict[str, Any]], known: list[tuple[list[float], int]]) -> float:
    """The share of ``answers`` whose label is the data set's label of the same image."""
    correct = sum(a["label"] == label for a, (_, label) in zip(answers, known, strict=True))
    return correct / len(known)


def assert_share(count: int, n: int, p: float) -> None:
    """``count`` of ``n`` draws is within 4.5 standard deviations of a binomial(n, p): a
    correct split fails this about once in 150,000 runs."""
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 4.5 * sd, f"{count} of {n} where about {n * p:.0f} were expected"


def batch_totals(text: str) -> tuple[float, float]:
    """(images, batches) of both model versions' ``_predict`` queues, from ``/-/metrics``."""
    images = batches = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("method") != "_predict":
                continue
            if sample.name == "aioserve_batch_size_sum":
                images += sample.value
            elif sample.name == "aioserve_batch_size_count":
                batches += sample.value
    return images, batches


async def predict_all(
    http: httpx.AsyncClient, images: list[list[float]], path: str = "/predict"
) -> list[dict[str, Any]]:
    """POST the images, 32 at a time; their answers, in order (each must be a 200)."""
    # Bounded: httpx's pool slows down more than linearly with hundreds of waiting requests.
    in_flight = asyncio.Semaphore(32)

    async def post(pixels: list[float]) -> httpx.Response:
        async with in_flight:
            return await http.post(path, json={"pixels": pixels})

    responses = await asyncio.gather(*(post(p) for p in images))
    assert [r.status_code for r in responses] == [200] * len(images), responses[0].text
    return [r.json() for r in responses]


@pytest.fixture
async def digits_serve() -> AsyncIterator[Serve]:
    """The example's deployment behind uvicorn on 127.0.0.1 (seeded traffic split)."""
    async with Serve(http_options={"host": "127.0.0.1", "port": 0}, seed=0) as serve:
        await setup(serve)
        yield serve


@pytest.fixture
async def digits_http(digits_serve: Serve) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for ``digits_serve``."""
    async with httpx.AsyncClient(base_url=str(digits_serve.url), timeout=30.0) as http:
        yield http


async def test_known_images_get_their_labels_from_shared_batches(
    digits_http: httpx.AsyncClient,
) -> None:
    known = known_images(20)
    answers = await predict_all(digits_http, [image for image, _ in known])

    assert accuracy(answers, known) >= 0.9
    assert {a["version"] for a in answers} <= {"v1", "v2"}
    images, batches = batch_totals((await digits_http.get("/-/metrics")).text)
    assert images == len(known)
    assert batches < len(known)  # concurrent requests shared a predict


async def test_a_tenth_of_the_requests_go_to_v2(digits_serve: Serve) -> None:
    n = 300
    image, label = known_images(1)[0]
    # From 16 threads with the example's blocking client: the server's loop is this test's, and
    # an async client on it would cost the server more time than the requests themselves.
    answers = await asyncio.to_thread(post_from_threads, str(digits_serve.url), [image] * n)

    versions = Counter(a["version"] for a in answers)
    assert set(versions) == {"v1", "v2"}
    assert_share(versions["v2"], n, V2_SHARE)
    assert {a["label"] for a in answers} == {label}


def post_from_threads(url: str, images: list[list[float]]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda pixels: client.classify(url, pixels), images))


BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"not json", 400, "cannot be decoded"),
    (b'{"pixels": [' + b"1" * 5000 + b"]}", 400, "Exceeds the limit"),
    (b'{"image": [0]}', 422, "no 'pixels' key"),
    (b"[0, 1, 2]", 422, "must be a JSON object"),
    (b'{"pixels": [1, 2, 3]}', 422, "got 3 values"),
    (b'{"pixels": "0123"}', 422, "got a string"),
    (b'{"pixels": [' + b"0, " * 63 + b'"x"]}', 422, "pixels[63] is 'x'"),
    (b'{"pixels": [' + b"0, " * 63 + b"true]}", 422, "pixels[63] is True"),
    (b'{"pixels": [17' + b", 0" * 63 + b"]}", 422, "pixels[0] is 17: each pixel is a number"),
    (b'{"pixels": [NaN' + b", 0" * 63 + b"]}", 422, "pixels[0] is nan"),
]


async def test_a_malformed_image_is_the_clients_error(digits_http: httpx.AsyncClient) -> None:
    for body, status, message in BAD_BODIES:
        response = await digits_http.post("/predict", content=body)
        assert (response.status_code, body) == (status, body), response.text
        assert message in response.text, (body, response.text)
    # and the deployment still answers
    image, label = known_images(1)[0]
    assert (await digits_http.post("/predict", json={"pixels": image})).json()["label"] == label


async def test_a_bad_body_fails_alone_never_the_batch_it_would_have_joined(
    digits_http: httpx.AsyncClient,
) -> None:
    known = known_images(16)
    in_flight = [digits_http.post("/predict", json={"pixels": image}) for image, _ in known]
    in_flight += [digits_http.post("/predict", json={"pixels": [1, 2]}) for _ in range(16)]
    responses = await asyncio.gather(*in_flight)

    good, bad = responses[:16], responses[16:]
    assert [r.status_code for r in good] == [200] * 16
    assert accuracy([r.json() for r in good], known) >= 0.9
    assert [r.status_code for r in bad] == [422] * 16
    images, _ = batch_totals((await digits_http.get("/-/metrics")).text)
    assert images == 16  # only checked images reached the model


async def test_the_batch_method_is_out_of_reach_of_clients(
    digits_serve: Serve, digits_http: httpx.AsyncClient
) -> None:
    image, label = known_images(1)[0]
    hidden = await digits_http.post(
        "/predict", json={"pixels": image}, headers={"X-Serve-Call-Method": "_predict"}
    )
    assert hidden.status_code == 404
    with pytest.raises(MethodNotFound, match="_predict"):
        await digits_serve.get_handle(MODEL_ENDPOINT).options(method_name="_predict").remote(image)
    # A handle call takes the same body as POST /predict, checked the same way.
    handle = digits_serve.get_handle(MODEL_ENDPOINT)
    assert (await handle.remote({"pixels": image}))["label"] == label
    with pytest.raises(HTTPException) as caught:
        await handle.remote({"pixels": [1, 2]})
    assert caught.value.status_code == 422
    assert "got 2 values" in caught.value.detail
    images, _ = batch_totals((await digits_http.get("/-/metrics")).text)
    assert images == 1


async def test_the_client_reports_accuracy_split_and_mean_batch(
    digits_http: httpx.AsyncClient,
) -> None:
    # The client is blocking (urllib and threads): run it off the loop that serves it.
    report = await asyncio.to_thread(client.run, str(digits_http.base_url), 100, 16)

    found = re.search(r"correct: (\d+) of 100", report)
    assert found is not None, report
    assert int(found.group(1)) >= 90  # images it never saw: about 97 % in practice
    assert re.search(r"answered by: v1 \d+ \(.*\), v2 \d+", report), report
    assert re.search(r"mean batch: digits-v1 \d+\.\d images per predict", report), report


async def test_the_fastapi_app_serves_the_mount_and_its_own_typed_route() -> None:
    known = known_images(20)
    async with (
        run_uvicorn(create_app(), startup_timeout_s=STARTUP_S) as url,
        httpx.AsyncClient(base_url=url, timeout=30.0) as http,
    ):
        mounted = await predict_all(http, [image for image, _ in known], "/models/predict")
        typed = await predict_all(http, [image for image, _ in known], "/classify")
        bad_mounted = await http.post("/models/predict", json={"pixels": [1, 2]})
        bad_typed = await http.post("/classify", json={"pixels": [1, 2]})
        schema = (await http.get("/openapi.json")).json()

    for answers in (mounted, typed):
        assert accuracy(answers, known) >= 0.9
        assert {a["version"] for a in answers} <= {"v1", "v2"}
    assert bad_mounted.status_code == 422
    assert "got 2 values" in bad_mounted.text
    assert bad_typed.status_code == 422
    assert bad_typed.json()["detail"][0]["loc"] == ["body", "pixels"]  # FastAPI's own error
    assert "/classify" in schema["paths"]


async def test_the_toml_file_declares_what_setup_builds() -> None:
    deployment = load_deployment(TOML)
    options = {"location": "NoServer"}
    async with Serve(http_options=options) as from_toml, Serve(http_options=options) as from_code:
        await deployment.state.apply(from_toml)
        await setup(from_code)
        assert from_toml.list_endpoints() == from_code.list_endpoints()
        assert from_toml.list_backends() == from_code.list_backends()
        assert from_toml.list_endpoints()["digits"]["traffic"] == TRAFFIC


async def test_aioserve_run_serves_the_toml_deployment(run: Callable[..., Running]) -> None:
    server = run(TOML, "--port", "0")
    url = server.url()
    known = known_images(20)
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        routes = (await http.get("/-/routes")).json()
        answers = await predict_all(http, [image for image, _ in known])
        bad = await http.post("/predict", json={"pixels": [1, 2]})

    assert routes["/predict"] == ["digits", ["POST"]]
    assert accuracy(answers, known) >= 0.9
    assert {a["version"] for a in answers} <= {"v1", "v2"}
    assert bad.status_code == 422
    assert "got 2 values" in bad.text


async def test_the_typed_api_checks_documents_and_answers(digits_http: httpx.AsyncClient) -> None:
    known = known_images(10)
    answers = await predict_all(digits_http, [image for image, _ in known], path="/api/predict")
    assert accuracy(answers, known) >= 0.9
    assert {a["version"] for a in answers} <= {"v1", "v2"}

    bad = await digits_http.post("/api/predict", json={"pixels": [0] * 63 + [17]})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "pixels", 63]
    short = await digits_http.post("/api/predict", json={"pixels": [1, 2, 3]})
    assert short.status_code == 422

    schema = (await digits_http.get("/api/openapi.json")).json()
    assert schema["info"]["title"] == "digits"
    image = schema["components"]["schemas"]["Image"]["properties"]["pixels"]
    assert (image["minItems"], image["maxItems"]) == (64, 64)
    assert "/api/openapi.json" in (await digits_http.get("/api/docs")).text
