"""Send the held-out digits to a running deployment and report what came back.

``python -m examples.digits.client [--url http://127.0.0.1:8000] [--images N] [--concurrency C]``

The images are the fifth of the data set the model was not trained on
(:func:`examples.digits.model.held_out`), sent ``C`` at a time, so that the model's batch queue
has something to batch. It prints the accuracy, how many answers each model version gave (the
traffic split) and the mean batch of each version, read from the server's ``/-/metrics`` before
and after. Against the FastAPI app, pass ``--url http://127.0.0.1:8000/models``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from examples.digits.model import held_out


def classify(url: str, pixels: list[float], timeout_s: float = 30.0) -> dict[str, Any]:
    """``POST {url}/predict`` with one image; the JSON answer."""
    request = urllib.request.Request(
        f"{url}/predict",
        data=json.dumps({"pixels": pixels}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        answer: dict[str, Any] = json.load(response)
        return answer


def batch_totals(url: str) -> dict[str, tuple[float, float]]:
    """``{backend: (images, batches)}`` of the model's ``_predict`` batch queues, from
    ``/-/metrics``."""
    with urllib.request.urlopen(f"{url}/-/metrics", timeout=30.0) as response:
        text = response.read().decode()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("method") != "_predict":
                continue
            if sample.name == "aioserve_batch_size_sum":
                totals[sample.labels["backend"]][0] = sample.value
            elif sample.name == "aioserve_batch_size_count":
                totals[sample.labels["backend"]][1] = sample.value
    return {backend: (images, batches) for backend, (images, batches) in totals.items()}


def run(url: str, num_images: int, concurrency: int) -> str:
    """Send ``num_images`` held-out images, ``concurrency`` at a time; the report as text."""
    images, labels = held_out()
    images, labels = images[:num_images], labels[:num_images]
    before = batch_totals(url)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(lambda pixels: classify(url, pixels), images))
    after = batch_totals(url)

    correct = sum(a["label"] == label for a, label in zip(answers, labels, strict=True))
    versions = collections.Counter(a["version"] for a in answers)
    lines = [
        f"{len(answers)} images the model never saw, {concurrency} at a time, to {url}/predict:",
        f"  correct: {correct} of {len(answers)} ({100 * correct / len(answers):.1f} %)",
        "  answered by: "
        + ", ".join(
            f"{version} {n} ({100 * n / len(answers):.1f} %)"
            for version, n in sorted(versions.items())
        ),
    ]
    batches = []
    for backend, (images_after, count_after) in sorted(after.items()):
        images_before, count_before = before.get(backend, (0.0, 0.0))
        if count_after > count_before:
            mean = (images_after - images_before) / (count_after - count_before)
            batches.append(f"{backend} {mean:.1f} images per predict")
    if batches:
        lines.append(f"  mean batch: {', '.join(batches)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.digits.client", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the deployment's base URL")
    parser.add_argument("--images", type=int, default=300, help="how many to send (at most 359)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    args = parser.parse_args(argv)
    if args.images < 1 or args.concurrency < 1:
        parser.error(
            f"--images and --concurrency must be at least 1, got {args.images!r} and "
            f"{args.concurrency!r}."
        )
    try:
        print(run(args.url.rstrip("/"), args.images, args.concurrency))
    except urllib.error.HTTPError as exc:
        print(
            f"{exc.url} answered {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr
        )
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(
            f"Cannot reach {args.url}: {exc}. Is the deployment running? "
            "Start it with: aioserve run examples.digits.deployment:setup",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
